"""Each user's ``ConceptRecognizer`` in the answering process: Ask's photo re-ranker.

Built from what ingest stored, never from re-mining: the user's manifests (patches, support
windows) and every mined photo's stored descriptors (``personalkv.mining.descriptors``; a
photo whose descriptors are missing, e.g. ingested before they were stored, is described
once and stored). A user's recognizer is kept per process and rebuilt only when the user's
mined content changes: its version is a hash over each concept's mined photos, patches and
support. An Ask reads the manifests only when the user's concepts stamp
(``ChunkStore.concepts_stamp``, one small object rewritten after every manifest change) differs
from the one the kept recognizer was checked against; otherwise it reads that stamp alone.
Descriptors already in memory are reused across rebuilds, so a new concept costs its own photos
plus one keypoint-index build.

    served = ServedRecognizers(store, DescriptorStore(store.objects, settings), settings)
    retriever = Retriever(..., visual_reranker=served.rerank)
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from cachetools import LRUCache

from personalkv.config import MiningSettings
from personalkv.images import rgb_array, upright
from personalkv.manifest import ConceptManifest
from personalkv.mining.descriptors import DescriptorStore
from personalkv.mining.miner import MinedConcept, MinedPatch, build_library
from personalkv.mining.recognizer import ConceptRecognizer
from personalkv.storage.chunk_store import ChunkStore

log = logging.getLogger(__name__)


@dataclass
class _UserState:
    version: str
    recognizer: ConceptRecognizer | None
    memo: dict = field(default_factory=dict)  # photo id -> described photo
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: the concepts stamp the version was last checked against (None: none existed)
    stamp: str | None = None


def mined_photos(manifest: ConceptManifest) -> list[str]:
    """The concept's photos that mining has seen (they have patches or support windows)."""
    seen = {p.photo_id for p in [*manifest.patches, *manifest.support]}
    return [p.photo_id for p in manifest.photos if p.photo_id in seen]


def _version(manifests: Sequence[ConceptManifest]) -> str:
    h = hashlib.sha256()
    for m in manifests:
        h.update(m.concept_id.encode())
        for pid in mined_photos(m):
            h.update(pid.encode())
        for p in [*m.patches, *m.support]:
            h.update(f"{p.photo_id}{p.box}{sorted(p.scores.items())}".encode())
    return h.hexdigest()


def mined_concept(manifest: ConceptManifest, shapes: dict[str, tuple[int, int]]) -> MinedConcept:
    """The manifest's patches and support windows as the recognizer wants them: indexed by the
    concept's mined photos and scaled into their working frame (``shapes``: photo id -> (h, w)
    of the described photo; patch boxes are in stored-photo pixels)."""
    pids = mined_photos(manifest)
    index = {pid: i for i, pid in enumerate(pids)}
    size = {p.photo_id: max(p.width, p.height) for p in manifest.photos}  # rotation-proof

    def scaled(pid: str, box) -> tuple[int, int, int, int]:
        h, w = shapes[pid]
        f = max(h, w) / max(1, size[pid])
        x0, y0, x1, y1 = (int(round(v * f)) for v in box)
        return max(0, x0), max(0, y0), min(w, max(x1, x0 + 1)), min(h, max(y1, y0 + 1))

    patches, support = [], []
    for p in manifest.patches:
        if p.photo_id not in index:
            continue
        if "support" in p.scores or "centre_prior" in p.scores:  # a fallback window, no evidence
            support.append((index[p.photo_id], scaled(p.photo_id, p.box)))
        else:
            patches.append(MinedPatch(index[p.photo_id], p.photo_id, scaled(p.photo_id, p.box),
                                      p.score, dict(p.scores)))
    support += [(index[p.photo_id], scaled(p.photo_id, p.box)) for p in manifest.support
                if p.photo_id in index]
    return MinedConcept(manifest.concept_id, patches, support)


class ServedRecognizers:
    """One recognizer per user (module doc); thread-safe; keeps the last ``max_users``."""

    def __init__(self, store: ChunkStore, descriptors: DescriptorStore,
                 settings: MiningSettings, max_users: int = 64,
                 accept_at: float = 0.5, adapter=None):
        """``accept_at``: the re-rank score a photo's concept gets at the recognizer's
        threshold (the retriever's threshold, see ``ConceptRecognizer.calibrated``).
        ``adapter``: the process's model adapter or a callable returning it (the ``vlm``
        embedder only)."""
        self.accept_at = accept_at
        self.adapter = adapter
        self.store = store
        self.descriptors = descriptors
        self.settings = settings
        self.max_users = max_users
        self._states: LRUCache[str, _UserState] = LRUCache(maxsize=max_users)
        self._lock = threading.Lock()
        self._pool_memo: dict = {}  # generic negative pool (path -> described), shared by users
        self.builds = 0  # recognizers built (tests, metrics)
        #: recognitions served and their summed seconds per stage (``Recognition.seconds``;
        #: the ingest benchmark reports them per retrieve)
        self.recognitions = 0
        self.views = 0  # photo views looked at (whole, tiles, zoom tiles), summed
        self.stage_seconds: dict[str, float] = {}

    def _manifests(self, user_id: str) -> list[ConceptManifest]:
        # answerable concepts only: cached at least once, with mined photos (a damaged
        # manifest is skipped: the user's other concepts are still recognized)
        return [m for m in self.store.read_manifests(user_id) if m.chunks and mined_photos(m)]

    def state(self, user_id: str) -> _UserState:
        stamp = self.store.concepts_stamp(user_id)
        with self._lock:
            state = self._states.get(user_id)  # a hit is the most recently used now
        if state is not None and stamp is not None and state.stamp == stamp:
            return state  # no manifest changed since the last check: nothing more to read
        manifests = self._manifests(user_id)
        version = _version(manifests)
        if state is not None and state.version == version:
            state.stamp = stamp  # changed, but not in anything the recognizer uses
            return state
        with (state.lock if state is not None else threading.Lock()):
            memo = dict(state.memo) if state is not None else {}
            fresh = self._build(user_id, manifests, version, memo)
            fresh.stamp = stamp
        with self._lock:
            self._states[user_id] = fresh  # evicts the least recently used beyond max_users
        return fresh

    def _build(self, user_id: str, manifests: list[ConceptManifest], version: str,
               memo: dict) -> _UserState:
        if not manifests:
            return _UserState(version, None, {})
        s = self.settings
        concepts, ids, owners = {}, {}, {}
        for m in manifests:
            pids = mined_photos(m)
            ids[m.concept_id] = pids
            concepts[m.concept_id] = [self._loader(user_id, m.concept_id, pid) for pid in pids]
            owners.update({pid: m.concept_id for pid in pids})
        keep = set(owners)
        cache = self.descriptors.cache_for(user_id, owners, {k: v for k, v in memo.items() if k in keep})
        pool = sorted(Path(s.negative_pool).glob("*.jpg")) if s.negative_pool else []
        for path in pool:  # generic pool: described once per process
            if str(path) in self._pool_memo:
                cache.memo[str(path)] = self._pool_memo[str(path)]
        library = build_library(s, concepts, [lambda p=p: rgb_array(p, s.max_side) for p in pool],
                                ids, [str(p) for p in pool], cache=cache, adapter=self.adapter)
        for path in pool:
            self._pool_memo[str(path)] = cache.memo[str(path)]
        shapes = {p.photo_id: p.shape for p in library.photos}
        mined = {m.concept_id: mined_concept(m, shapes) for m in manifests}
        recognizer = ConceptRecognizer(library, mined, s, pool_margins=True)
        self.builds += 1
        log.info("recognizer of %s: %d concepts, %d photos (%d described, %d loaded)", user_id,
                 len(manifests), len(owners), cache.described, cache.loaded)
        return _UserState(version, recognizer, {k: v for k, v in cache.memo.items() if k in keep})

    def _loader(self, user_id: str, concept_id: str, photo_id: str):
        return lambda: rgb_array(self.store.get_photo(user_id, concept_id, photo_id), self.settings.max_side)

    def rerank(self, user_id: str, image, candidates: Sequence[str]) -> dict[str, float]:
        """``personalkv.retrieval.retriever.VisualReranker``: the recognizer's calibrated score
        (``accept_at`` at ``PERSONALKV_MINING_THRESHOLD``) for each candidate it knows."""
        state = self.state(user_id)
        rec = state.recognizer
        if rec is None:
            return {}
        known = [c for c in candidates if c in rec.library.concept_ids]
        if not known:
            return {}
        # framed like the library's photos (max_side), whole and in tiles (recognizer.photo_views)
        with state.lock:  # FLANN's matcher is not documented thread-safe
            result = rec.recognize_photo(upright(image), known)
        with self._lock:
            self.recognitions += 1
            self.views += result.n_views
            for stage, seconds in (result.seconds or {}).items():
                self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds
        return {c: rec.calibrated(v, self.accept_at) for c, v in result.scores.items()}
