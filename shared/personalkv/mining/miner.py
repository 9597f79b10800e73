"""Top-level mining: the distinct patches of each concept of one user.

    library = build_library(settings, {"bo": bo_photos, "mam": mam_photos}, negatives)
    mined = Miner(library, settings).mine("bo")          # MinedConcept, patches best first
    records = mined.patch_records()                      # personalkv.manifest.PatchRecord list

``mine_concept(photos, others=..., negatives=..., settings=...)`` does both for one concept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from personalkv.config import MiningSettings
from personalkv.mining.registry import get_local_extractor, get_patch_embedder, get_subject_prior
from personalkv.mining.library import PhotoLibrary
from personalkv.mining.proposals import nms
from personalkv.mining.saliency import SubjectPrior
from personalkv.mining.scoring import RelevanceScorer, combine, pool_appearance, score_windows


#: combined scores at or below this are the subject prior's tie-break alone (see scoring.combine)
EVIDENCE_FLOOR = 0.05


@dataclass
class MinedPatch:
    photo_index: int  # index among the concept's photos
    photo_id: str
    box: tuple[int, int, int, int]
    score: float
    scores: dict[str, float]


@dataclass
class MinedConcept:
    concept_id: str
    patches: list[MinedPatch] = field(default_factory=list)
    #: the best few windows of *every* photo (photo_index, box): the subject region the
    #: recognizer lets vote, also on photos that hold none of the top-k patches.
    support: list[tuple[int, tuple[int, int, int, int]]] = field(default_factory=list)

    def patch_records(self) -> list:
        """As ``personalkv.manifest.PatchRecord`` (photo ids must be the stored hex digests)."""
        from personalkv.manifest import PatchRecord

        return [PatchRecord(photo_id=p.photo_id, box=p.box, score=p.score, scores=p.scores)
                for p in self.patches]


def build_library(settings: MiningSettings, concepts: Mapping[str, Sequence[np.ndarray]],
                  negatives: Sequence[np.ndarray] = (),
                  photo_ids: Mapping[str, Sequence[str]] | None = None,
                  negative_ids: Sequence[str] | None = None, cache: dict | None = None,
                  progress: Callable[[str], None] | None = None, adapter=None) -> PhotoLibrary:
    """Describes every photo (local features, window embeddings) and builds the keypoint index. With a
    ``cache`` dict, photos already described under the same id are not described again.
    ``progress`` receives a line per concept described (describing is the slow part).
    ``adapter``: the process's model adapter (or a callable returning it), for the ``vlm``
    embedder only."""
    library = PhotoLibrary(get_local_extractor(settings.extractor), get_patch_embedder(settings.embedder, adapter, settings.window_scales,
                                                               settings.window_split),
                           ratio=settings.ratio, ransac_px=settings.ransac_px,
                           min_inliers=settings.min_inliers, cache=cache)
    for i, (cid, photos) in enumerate(concepts.items()):
        library.add_concept(cid, photos, None if photo_ids is None else photo_ids.get(cid))
        if progress is not None:
            progress(f"described {cid} ({i + 1}/{len(concepts)} concepts, {len(photos)} photos)")
    library.add_negatives(negatives, negative_ids)
    if progress is not None and len(negatives):
        progress(f"described {len(negatives)} negative-pool photos")
    library.build()
    return library


class Miner:
    def __init__(self, library: PhotoLibrary, settings: MiningSettings,
                 prior: SubjectPrior | None = None, relevance: RelevanceScorer | None = None):
        self.library = library
        self.settings = settings
        self.prior = prior or get_subject_prior(self.settings.subject_prior)
        if relevance is None and self.settings.relevance:
            relevance = get_relevance_scorer(self.settings.relevance)
        self.relevance = relevance

    def mine(self, concept_id: str, images: Sequence[np.ndarray], profile_text: str = "") -> MinedConcept:
        """``images`` are the concept's photos in the order they were added to the library
        (the library keeps features only, the prior and the sheets need pixels)."""
        owner = self.library.concept_ids.index(concept_id)
        photos = self.library.photos_of(owner)
        pool = pool_appearance(self.library, owner)
        windows = []
        for idx, image in zip(photos, images):
            rel = None
            if self.relevance is not None and profile_text:
                lp = self.library.photos[idx]
                crops = [image[int(y0):int(y1), int(x0):int(x1)] for x0, y0, x1, y1 in lp.boxes]
                rel = np.asarray(self.relevance(crops, profile_text), np.float32)
            windows.append(score_windows(self.library, idx, self.prior.prior(image), pool, rel))
        scale = max([float(w.parts["consistency"].max(initial=0)) for w in windows] + [1.0])
        candidates, support = [], []
        for local_i, w in enumerate(windows):
            total = combine(w.parts, scale)
            keep = nms(w.boxes, total, self.settings.top_k, self.settings.nms_iou)
            candidates.extend((float(total[j]), local_i, w, j) for j in keep)
            support.extend((local_i, tuple(int(round(v)) for v in w.boxes[j]))
                           for j in keep[: self.settings.support_per_photo])
        candidates.sort(key=lambda c: -c[0])
        # At most twice a photo's fair share of the k patches, so that the evidence (and the
        # KV chunks made from it) covers several views, not only the sharpest close-up.
        # Windows without real evidence (score at the subject tie-break level) never displace
        # an evidenced one; they only fill up to k when nothing better is left.
        cap = max(2, -(-2 * self.settings.top_k // max(1, len(windows))))
        chosen, per_photo = [], {}
        for cand in candidates:
            if cand[0] > EVIDENCE_FLOOR and per_photo.get(cand[1], 0) < cap:
                chosen.append(cand)
                per_photo[cand[1]] = per_photo.get(cand[1], 0) + 1
        rest = [c for c in candidates if not any(c is x for x in chosen)]
        chosen = sorted(chosen, key=lambda c: -c[0])[: self.settings.top_k]
        chosen = sorted(chosen + rest[: self.settings.top_k - len(chosen)], key=lambda c: -c[0])
        patches = []
        for score, local_i, w, j in chosen:
            x0, y0, x1, y1 = (int(round(v)) for v in w.boxes[j])
            lp = self.library.photos[w.photo]
            h, wd = lp.shape
            box = (max(0, x0), max(0, y0), min(wd, x1), min(h, y1))
            patches.append(MinedPatch(local_i, lp.photo_id, box, round(score, 4),
                                      {k: round(float(v[j]), 4) for k, v in w.parts.items()}))
        return MinedConcept(concept_id, patches, support)


def get_relevance_scorer(name: str) -> RelevanceScorer:
    """``clip:<hub id or path>`` -> a CLIP / SigLIP text-image relevance scorer."""
    if not name.startswith("clip:"):
        raise ValueError(f"unknown relevance scorer {name!r}; expected 'clip:<hub id or path>'")
    from personalkv.mining.clip import make_clip_relevance

    return make_clip_relevance(name.removeprefix("clip:"))


def mine_concept(concept_id: str, photos: Sequence[np.ndarray],
                 others: Mapping[str, Sequence[np.ndarray]] | None = None,
                 negatives: Sequence[np.ndarray] = (), *, settings: MiningSettings,
                 photo_ids: Sequence[str] | None = None) -> MinedConcept:
    """Mines one concept against the user's ``others`` concepts and a generic ``negatives`` pool."""
    concepts = {concept_id: photos, **(others or {})}
    ids = {concept_id: photo_ids} if photo_ids is not None else None
    library = build_library(settings, concepts, negatives, ids)
    return Miner(library, settings).mine(concept_id, photos)
