"""Which of a user's concepts a photo shows, or none: the visual re-ranker of retrieval.

Score of concept ``c`` for a query photo:

    keypoints(c)  = log1p(sum of verified inliers with the two best-matching photos of c)
    appearance(c) = mean of the 3 best (max window similarity - pool similarity) of c's patches,
                    windows embedded by the library's PatchEmbedder (EfficientNet-Lite crops
                    by default, colour histograms weights-free)
    fused(c)      = keypoints(c) + appearance_weight * appearance(c)

The best concept is the answer when its fused score reaches ``threshold``; otherwise the photo
shows "none of your concepts". Matching uses the library's rule (ratio test across owners, so
features shared with the pool or with other concepts vote for nobody; RANSAC similarity).

    rec = ConceptRecognizer(library, mined, settings)
    result = rec.recognize(photo)          # Recognition(scores, best, accepted)
    retriever = Retriever(..., visual_reranker=rec.as_reranker())
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from personalkv.config import MiningSettings
from personalkv.images import rgb_array
from personalkv.mining.library import PhotoLibrary
from personalkv.mining.miner import MinedConcept
from personalkv.mining.proposals import points_in_boxes, propose_boxes
from personalkv.mining.scoring import pool_appearance


@dataclass(frozen=True)
class Recognition:
    scores: dict[str, float]  # fused score per concept
    best: str | None  # best-scoring concept, or None when the library has none
    accepted: bool  # best reaches the threshold; False means "none of your concepts"
    keypoint_scores: dict[str, float]
    appearance_scores: dict[str, float]
    #: log1p inliers counting every library keypoint / only those in the mined subject region
    keypoint_all: dict[str, float] | None = None
    keypoint_subject: dict[str, float] | None = None
    appearance_raw: dict[str, float] | None = None
    #: wall seconds per stage: keypoints (RootSIFT of the query), matching (index + RANSAC),
    #: windows (proposals + their embeddings), scoring
    seconds: dict[str, float] | None = None

    @property
    def concept(self) -> str | None:
        return self.best if self.accepted else None


class ConceptRecognizer:
    """``pool_margins``: measure each patch's pool similarity against this library (every photo
    not of its concept) instead of taking the one its mining recorded. The service sets it:
    a concept mined first saw no other concepts, and its recorded margins would stay inflated
    as the user adds more."""

    def __init__(self, library: PhotoLibrary, mined: Mapping[str, MinedConcept],
                 settings: MiningSettings, pool_margins: bool = False):
        self.library = library
        self.settings = settings
        self.pool_margins = pool_margins
        self._patches: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._subject: dict[int, np.ndarray] = {}  # library photo -> keypoint mask
        for cid in library.concept_ids:
            self._patches[cid] = self._patch_appearance(cid, mined.get(cid))
            self._subject_masks(cid, mined.get(cid))

    def _subject_masks(self, cid: str, mined: MinedConcept | None) -> None:
        """Keypoints inside the concept's support windows (patches and per-photo best windows)."""
        photos = self.library.photos_of(self.library.concept_ids.index(cid))
        for idx in photos:
            self._subject[idx] = np.zeros(len(self.library.photos[idx].local), bool)
        if mined is None:
            return
        boxes = list(mined.support) + [(p.photo_index, p.box) for p in mined.patches]
        grow = self.settings.support_grow
        for local_i, box in boxes:
            idx = photos[local_i]
            x0, y0, x1, y1 = box
            cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * grow / 2, (y1 - y0) * grow / 2
            big = np.asarray([[cx - hw, cy - hh, cx + hw, cy + hh]], np.float32)
            self._subject[idx] |= points_in_boxes(self.library.photos[idx].local.xy, big)[0]

    def _patch_appearance(self, cid: str, mined: MinedConcept | None) -> tuple[np.ndarray, np.ndarray]:
        """Embedding of each mined patch and its pool similarity (consistency - margin)."""
        if mined is None or not mined.patches:
            return np.zeros((0, 1), np.float32), np.zeros(0, np.float32)
        owner = self.library.concept_ids.index(cid)
        photos = self.library.photos_of(owner)
        rows, negs = [], []
        for p in mined.patches:
            lp = self.library.photos[photos[p.photo_index]]
            j = int(np.argmin(np.abs(lp.boxes - np.asarray(p.box, np.float32)).sum(1)))
            rows.append(lp.appearance[j])
            negs.append(p.scores.get("appearance_consistency", 1.0) - p.scores.get("appearance_margin", 0.0))
        rows = np.stack(rows)
        if self.pool_margins:  # as appearance_evidence: mean of the 3 most similar pool windows
            pool = pool_appearance(self.library, owner)
            if pool.size and pool.shape[1] == rows.shape[1]:
                sims = rows @ pool.T
                k = min(3, sims.shape[1])
                negs = np.partition(sims, -k, axis=1)[:, -k:].mean(1)
            else:
                negs = np.zeros(len(rows), np.float32)
        return rows, np.asarray(negs, np.float32)

    def recognize(self, image: np.ndarray, candidates: Sequence[str] | None = None) -> Recognition:
        lib = self.library
        t0 = time.perf_counter()
        query = lib.extractor.extract(image)
        t1 = time.perf_counter()
        inliers: dict[str, list[int]] = {cid: [] for cid in lib.concept_ids}
        subject: dict[str, list[int]] = {cid: [] for cid in lib.concept_ids}
        for m in lib.match(query):
            if m.owner >= 0:
                inliers[lib.concept_ids[m.owner]].append(m.inliers)
                mask = self._subject.get(m.photo)
                subject[lib.concept_ids[m.owner]].append(int(mask[m.photo_idx].sum()) if mask is not None else 0)
        t2 = time.perf_counter()
        boxes = propose_boxes(image.shape, lib.embedder.window_fractions)
        windows = lib.embedder.embed_boxes(image, boxes)
        t3 = time.perf_counter()
        kp, app, fused, kp_all, kp_subj, app_raw = {}, {}, {}, {}, {}, {}
        for cid in candidates if candidates is not None else lib.concept_ids:
            kp_all[cid] = float(np.log1p(sum(sorted(inliers.get(cid, []))[-2:])))
            kp_subj[cid] = float(np.log1p(sum(sorted(subject.get(cid, []))[-2:])))
            kp[cid] = kp_subj[cid] if self.settings.vote_region == "subject" else kp_all[cid]
            emb, neg = self._patches.get(cid, (np.zeros((0, 1)), np.zeros(0)))
            if len(emb) and emb.shape[1] == windows.shape[1]:
                best_sim = (emb @ windows.T).max(1)
                app[cid] = float(np.sort(best_sim - neg)[-3:].mean())
                app_raw[cid] = float(np.sort(best_sim)[-3:].mean())
            else:
                app[cid] = app_raw[cid] = 0.0
            fused[cid] = kp[cid] + self.settings.appearance_weight * app[cid]
        best = max(fused, key=fused.get) if fused else None
        accepted = best is not None and fused[best] >= self.settings.threshold
        seconds = {"keypoints": t1 - t0, "matching": t2 - t1, "windows": t3 - t2,
                   "scoring": time.perf_counter() - t3}
        return Recognition(fused, best, accepted, kp, app, kp_all, kp_subj, app_raw, seconds)

    def calibrated(self, score: float, at_threshold: float = 0.5) -> float:
        """Fused score -> [0, 1] (logistic, slope 2 per score unit), ``at_threshold`` at the
        threshold: the retriever passes its own threshold, so that a photo alone returns a
        concept exactly when the recognizer accepts it."""
        offset = float(np.log(at_threshold / (1.0 - at_threshold)))
        return float(1.0 / (1.0 + np.exp(-(2.0 * (score - self.settings.threshold) + offset))))

    def as_reranker(self):
        """A ``personalkv.retrieval.retriever.VisualReranker`` for this user's library:
        ``(user_id, PIL image, candidate ids) -> {concept_id: score in [0, 1]}``."""

        def rerank(user_id: str, image, candidates: Sequence[str]) -> dict[str, float]:
            known = [c for c in candidates if c in self.library.concept_ids]
            # in the library's working frame (max_side), as its photos were described
            rgb = rgb_array(image, self.settings.max_side)
            result = self.recognize(rgb, known)
            return {c: self.calibrated(s) for c, s in result.scores.items()}

        return rerank
