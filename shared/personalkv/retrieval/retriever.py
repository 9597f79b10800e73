"""The retriever: given a user, a question and maybe a photo, rank that user's concepts and
return the KV chunks to place.

Called by the answering service once per Ask, before it loads and places chunks
(``RetrievedConcept.chunks`` are the ``ChunkRef``s the index hits carry: chunk id, object key,
token count, position span). Reads only the key index - never a manifest - so an Ask costs a
few index round trips.

Scoring, per concept of this user and model fingerprint:

* text: best cosine of the question against the concept's text keys (profile text, name);
* image: with a visual re-ranker (the service's: the mining recognizer, see
  ``personalkv.mining.served``), its score for every concept of the user it knows; otherwise,
  and for concepts it does not know yet, the best cosine of the question photo - whole and in
  overlapping crops, because a user's photo shows the thing somewhere in a scene while its keys
  are mined patches - against the concept's patch and photo keys (the index search is skipped
  when the re-ranker scored every concept);
* name: 1 when the question names the concept ("is Bobo hungry?").

Each cosine is mapped from [encoder.score_floor, encoder.score_match] onto [0, 1]; text and image
are fused as a weighted noisy-OR, ``1 - (1 - w_t t)(1 - w_i i)``, so one strong modality suffices
(a photo with "what is this?" must find the concept; averaging would halve it) and two moderate
ones reinforce; the name bonus is added. Concepts under ``threshold``, or (unless the question
names them or the re-ranker accepted them in the photo on their own evidence) under
``relative_cut`` x the best score, are dropped: an empty result means "none of your concepts".
Several concepts can pass.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from personalkv.chunk_ref import ChunkRef
from personalkv.config import RetrievalSettings
from personalkv.ids import validate_user_id
from personalkv.index.base import KeyIndex, SearchHit, SearchRequest
from personalkv.images import ImageLike, upright
from personalkv.retrieval.keys import NAME_PREFIX, KeyBuilder

log = logging.getLogger(__name__)

#: ``(user_id, photo, candidate concept ids) -> {concept_id: score in [0, 1]}``.
VisualReranker = Callable[[str, Image.Image, Sequence[str]], Mapping[str, float]]


@dataclass(frozen=True)
class RetrievedConcept:
    concept_id: str
    score: float
    text_score: float = 0.0
    image_score: float = 0.0
    named: bool = False
    chunks: tuple[ChunkRef, ...] = ()


@dataclass(frozen=True)
class RetrievalResult:
    user_id: str
    model_fingerprint: str
    concepts: list[RetrievedConcept] = field(default_factory=list)
    #: Every scored concept, best first, also those under the threshold (for logs and evals).
    candidates: list[RetrievedConcept] = field(default_factory=list)

    @property
    def none_matched(self) -> bool:
        return not self.concepts

    def chunks(self) -> list[ChunkRef]:
        """All chunks to place, best concept first."""
        return [c for concept in self.concepts for c in concept.chunks]


def query_crops(image: Image.Image, scales=(0.35, 0.5, 0.7)) -> list[Image.Image]:
    """The whole photo and windows of 35/50/70 % of its sides at half-window strides (39 in all):
    keys are tight patches, so some window must frame the object about as tightly. Measured on
    the test scenes: one scale only lost a quarter of the true matches; more scales cost time
    (~0.8 ms per crop) and add little."""
    w, h = image.size
    crops = [image]
    for s in scales:
        cw, ch = max(1, int(w * s)), max(1, int(h * s))
        xs = sorted({*range(0, w - cw + 1, max(1, cw // 2)), w - cw})
        ys = sorted({*range(0, h - ch + 1, max(1, ch // 2)), h - ch})
        crops += [image.crop((x, y, x + cw, y + ch)) for y in ys for x in xs]
    return crops


def _calibrate(score: float, floor: float, match: float) -> float:
    return float(np.clip((score - floor) / max(match - floor, 1e-6), 0.0, 1.0))


def names_in(question: str, names: Mapping[str, str]) -> set[str]:
    """Concept ids whose name occurs in ``question`` as whole words, case-insensitively."""
    text = question.lower()
    found = set()
    for concept_id, name in names.items():
        name = name.strip().lower()
        if len(name) >= 2 and re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", text):
            found.add(concept_id)
    return found


class Retriever:
    def __init__(self, index: KeyIndex, keys: KeyBuilder, settings: RetrievalSettings,
                 visual_reranker: VisualReranker | None = None):
        self.index = index
        self.keys = keys
        self.settings = settings
        self.visual_reranker = visual_reranker

    def retrieve(self, user_id: str, question: str, photo: ImageLike | None = None,
                 top_k: int | None = None, *, model_fingerprint: str) -> RetrievalResult:
        validate_user_id(user_id)
        s, top_k = self.settings, top_k or self.settings.top_k
        text = self._text_scores(user_id, model_fingerprint, question) if question.strip() else {}
        names = self._names(user_id, model_fingerprint)
        named = names_in(question, names)
        image: dict[str, float] = {}
        verified: set[str] = set()  # concepts the re-ranker accepted on their own evidence
        pil = upright(photo) if photo is not None else None  # Ask's: decoded already
        if pil is not None:
            if self.visual_reranker is not None:
                image = {c: float(v) for c, v in
                         self.visual_reranker(user_id, pil, sorted(names)).items() if c in names}
                verified = {c for c, v in image.items() if v >= s.threshold}
            if self.visual_reranker is None or set(names) - set(image):
                for c, v in self._image_scores(user_id, model_fingerprint, pil).items():
                    image.setdefault(c, v)
        scored = []
        for concept_id in set(text) | set(image) | named:
            t, i = text.get(concept_id, 0.0), image.get(concept_id, 0.0)
            fused = 1.0 - (1.0 - min(s.weight_text, 1.0) * t) * (1.0 - min(s.weight_image, 1.0) * i)
            fused += s.weight_name if concept_id in named else 0.0
            scored.append(RetrievedConcept(concept_id, round(fused, 6), t, i, concept_id in named))
        scored.sort(key=lambda c: (-c.score, c.concept_id))
        relative = s.relative_cut * scored[0].score if scored else 0.0
        # A concept the question names is kept whatever the best scored: "Bobo and Rex" wants both;
        # so is one the re-ranker verified in the photo: a photo of two things shows both, and
        # the weaker one's own evidence passed (the recognizer already keeps one region from
        # counting for two concepts).
        chosen = [c for c in scored if c.score >= s.threshold
                  and (c.named or c.concept_id in verified or c.score >= relative)][:top_k]
        chunks = self._chunks(user_id, model_fingerprint, [c.concept_id for c in chosen])
        chosen = [RetrievedConcept(c.concept_id, c.score, c.text_score, c.image_score, c.named,
                                   tuple(chunks.get(c.concept_id, ()))) for c in chosen]
        return RetrievalResult(user_id, model_fingerprint, chosen, scored)

    # -- evidence ----------------------------------------------------------------------------
    def _own(self, hits: list[SearchHit], user_id: str, fingerprint: str) -> list[SearchHit]:
        # Every query already filters by user; this is the second lock on the same door.
        mine = [h for h in hits if h.user_id == user_id and h.model_fingerprint == fingerprint]
        if len(mine) != len(hits):
            log.error("index returned %d foreign entries for user %s", len(hits) - len(mine), user_id)
        return mine

    def _best(self, hits: list[SearchHit], floor: float, match: float) -> dict[str, float]:
        best: dict[str, float] = {}
        for h in hits:
            best[h.concept_id] = max(best.get(h.concept_id, 0.0), _calibrate(h.score, floor, match))
        return best

    def _text_scores(self, user_id: str, fingerprint: str, question: str) -> dict[str, float]:
        enc = self.keys.text_encoder
        request = SearchRequest(self.keys.text_space, user_id, fingerprint,
                                enc.encode([question])[0], limit=self.settings.candidates)
        hits = self._own(self.index.search(request), user_id, fingerprint)
        return self._best(hits, enc.score_floor, enc.score_match)

    def _image_scores(self, user_id: str, fingerprint: str, photo: Image.Image) -> dict[str, float]:
        enc = self.keys.image_encoder
        request = SearchRequest(self.keys.image_space, user_id, fingerprint,
                                enc.encode(query_crops(photo)), limit=self.settings.candidates)
        hits = self._own(self.index.search(request), user_id, fingerprint)
        return self._best(hits, enc.score_floor, enc.score_match)

    def _names(self, user_id: str, fingerprint: str) -> dict[str, str]:
        hits = self.index.entries_of(self.keys.text_space, user_id, fingerprint, kinds=["name"])
        return {h.concept_id: h.source[len(NAME_PREFIX):]
                for h in self._own(hits, user_id, fingerprint)}

    def _chunks(self, user_id: str, fingerprint: str,
                concept_ids: list[str]) -> dict[str, list[ChunkRef]]:
        if not concept_ids:
            return {}
        kinds = ["profile_text", "image_patch"]
        hits = [h for space in (self.keys.text_space, self.keys.image_space)
                for h in self.index.entries_of(space, user_id, fingerprint, concept_ids, kinds)]
        out: dict[str, dict[str, ChunkRef]] = {}
        for h in self._own(hits, user_id, fingerprint):
            if h.chunk is not None:
                out.setdefault(h.concept_id, {})[h.chunk.chunk_id] = h.chunk
        # Placement order: the profile text first, then patches in mining order.
        order = lambda c: (c.kind != "profile_text", int(c.source) if c.source.isdigit() else 1 << 30,
                           c.chunk_id)
        return {cid: sorted(chunks.values(), key=order) for cid, chunks in out.items()}
