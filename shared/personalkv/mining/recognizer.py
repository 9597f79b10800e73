"""Which of a user's concepts a photo shows, or none: the visual re-ranker of retrieval.

Score of concept ``c`` for a query photo:

    keypoints(c)  = log1p(sum of verified inliers with the two best-matching photos of c)
    appearance(c) = mean of the 3 best (max window similarity - pool similarity) of c's patches,
                    windows embedded by the library's PatchEmbedder (EfficientNet-Lite crops
                    by default, colour histograms weights-free)
    fused(c)      = keypoints(c) + appearance_weight * appearance(c)

Every concept whose fused score reaches ``threshold`` is in the photo, each on its own
evidence, whatever the others scored; none reaching it means "none of your concepts".
Matching uses the library's rule (ratio test across owners, so features shared with the pool
or with other concepts vote for nobody; RANSAC similarity). Two more rules make "every concept
in the photo" hold (issue 23):

* views: a wide photo (things side by side, a panorama) is also scored in square tiles, each
  framed like a photo of its own, and a concept's score is its best over the views
  (``photo_views``); optionally, when nothing is accepted, a grid of close-ups (``zoom_views``);
* exclusive regions: within a view, concepts are taken best first and the windows an accepted
  concept's patches matched are not evidence for the next (keypoints already vote for one owner).

    rec = ConceptRecognizer(library, mined, settings)
    result = rec.recognize(photo)          # Recognition(scores, best, accepted), working frame
    result = rec.recognize_photo(pil)      # any resolution: whole photo, tiles, zoom
    retriever = Retriever(..., visual_reranker=rec.as_reranker())
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from personalkv.cancellation import check_stop
from personalkv.config import MiningSettings
from personalkv.images import pixels, upright
from personalkv.mining.features import SiftExtractor
from personalkv.mining.library import PhotoLibrary
from personalkv.mining.miner import MinedConcept
from personalkv.mining.proposals import box_iou, points_in_boxes, propose_boxes
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
    #: the view (0: the whole photo, k: ``tiles[k - 1]``) each concept scored best in
    views: dict[str, int] | None = None
    n_views: int = 1  # views looked at (the whole photo, tiles, zoom tiles)

    @property
    def concept(self) -> str | None:
        return self.best if self.accepted else None


#: A window overlapping an accepted concept's windows this much (IoU) is that concept's region.
CLAIM_IOU = 0.5
#: side of a zoom tile, as a share of the photo's (overlapping tiles of a 2x2 grid)
ZOOM_SIDE = 0.6


@dataclass(frozen=True)
class ConceptEvidence:
    """One concept's evidence in one view of the query photo."""

    fused: float
    keypoints: float
    appearance: float
    keypoints_all: float
    keypoints_subject: float
    appearance_raw: float
    windows: np.ndarray  # the view's windows its best patches matched
    view: int = 0


@dataclass(frozen=True)
class _ViewEvidence:
    inliers: dict[str, list[int]]  # concept -> verified inliers per matching library photo
    subject: dict[str, list[int]]  # the same, counting only subject-region library keypoints
    boxes: np.ndarray
    windows: np.ndarray  # embeddings of ``boxes``


#: most tiles one photo is looked at in (``photo_views``): its recognition cost is bounded
MAX_TILES = 8
#: a view's appearance windows (each one CNN forward): at most MAX_VIEW_WINDOWS, evenly
#: spread (a view up to 3:1 has 60-195, unchanged; a strip's count grows with its length),
#: and none in a view no window can see a thing in: shorter side under MIN_VIEW_SIDE pixels, or longer than
#: MAX_VIEW_ASPECT times its width (a 20000x1 photo took minutes of windows; issue 30)
MAX_VIEW_WINDOWS, MIN_VIEW_SIDE, MAX_VIEW_ASPECT = 200, 16, 8.0


def query_windows(shape: tuple[int, ...], fractions: Sequence[float]) -> np.ndarray:
    """The windows one view of a question's photo is embedded in (bounded: see above)."""
    h, w = shape[:2]
    if min(h, w) < MIN_VIEW_SIDE or max(h, w) > MAX_VIEW_ASPECT * min(h, w):
        return np.zeros((0, 4), np.float32)
    boxes = propose_boxes(shape, fractions)
    if len(boxes) > MAX_VIEW_WINDOWS:
        boxes = boxes[np.linspace(0, len(boxes) - 1, MAX_VIEW_WINDOWS).round().astype(int)]
    return boxes


def photo_views(image: Image.Image, settings: MiningSettings) -> tuple[np.ndarray, list[np.ndarray]]:
    """The whole photo in the working frame (``max_side``), and the tiles it is also looked at
    in: a photo whose long side is at least ``tile_aspect`` times its short side (a panorama,
    things side by side) is covered by ceil(long / short) square tiles, evenly spaced, each cut
    from the full-resolution photo and framed on its own, so that each thing in it is seen at
    about the size a single photo of it would have (a 3:1 photo framed whole gives each third
    a third of the pixels)."""
    whole = pixels(image, settings.max_side)
    w, h = image.size
    long, short = max(w, h), min(w, h)
    if not settings.tile_aspect or short < 1 or long < settings.tile_aspect * short:
        return whole, []
    # At most MAX_TILES (a bounded cost per photo): past that each tile is longer than wide.
    count = min(math.ceil(long / short), MAX_TILES)
    side = max(short, math.ceil(long / count))
    tiles = []
    for start in np.linspace(0, long - side, count):
        a = int(round(start))
        box = (a, 0, a + side, h) if w >= h else (0, a, w, a + side)
        tiles.append(pixels(image.crop(box), settings.max_side))
    return whole, tiles


def zoom_views(image: Image.Image, settings: MiningSettings) -> list[np.ndarray]:
    """``zoom_grid`` x ``zoom_grid`` overlapping tiles (each ``ZOOM_SIDE`` of the photo's sides),
    each framed on its own: a small thing on a shelf gets the pixels and windows of a close-up."""
    n = settings.zoom_grid
    if n < 2:
        return []
    w, h = image.size
    tw, th = max(1, round(w * ZOOM_SIDE)), max(1, round(h * ZOOM_SIDE))
    return [pixels(image.crop((int(x), int(y), int(x) + tw, int(y) + th)), settings.max_side)
            for y in np.linspace(0, h - th, n) for x in np.linspace(0, w - tw, n)]



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
        self._query_sift: SiftExtractor | None = None
        self._patches: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._subject: dict[int, np.ndarray] = {}  # library photo -> keypoint mask
        for cid in library.concept_ids:
            self._patches[cid] = self._patch_appearance(cid, mined.get(cid))
            self._subject_masks(cid, mined.get(cid))

    def _query_extractor(self):
        """The library's keypoint extractor, or RootSIFT with the query's own upscale cap
        (``query_upscale``; the library's photos keep theirs): fewer query keypoints make both
        extraction and matching cheaper."""
        ex = self.library.extractor
        cap = self.settings.query_upscale
        if not cap or not isinstance(ex, SiftExtractor) or cap == ex.max_upscale:
            return ex
        if self._query_sift is None or self._query_sift.max_upscale != cap:
            self._query_sift = SiftExtractor(ex.max_features, ex.contrast, ex.min_side, cap)
        return self._query_sift

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

    def recognize(self, image: np.ndarray, candidates: Sequence[str] | None = None,
                  tiles: Sequence[np.ndarray] = ()) -> Recognition:
        """``image``: the photo in the library's working frame (``max_side``); ``tiles``: more
        views of it (``photo_views``), each scored like a photo of its own. A concept's score is
        its best over the views; within a view, a region that explains one concept is not
        re-used for another (``_view_scores``)."""
        seconds: dict[str, float] = {}
        views = [self._view_evidence(v, seconds) for v in [image, *tiles]]
        return self._combine(views, candidates, seconds)

    def _combine(self, views: list[_ViewEvidence], candidates: Sequence[str] | None,
                 seconds: dict[str, float]) -> Recognition:
        ids = list(candidates) if candidates is not None else list(self.library.concept_ids)
        t = time.perf_counter()
        best: dict[str, ConceptEvidence] = {}
        for k, ev in enumerate(views):
            for cid, e in self._view_scores(ev, ids).items():
                if cid not in best or e.fused > best[cid].fused:
                    best[cid] = dataclasses.replace(e, view=k)
        fused = {c: e.fused for c, e in best.items()}
        top = max(fused, key=fused.get) if fused else None
        accepted = top is not None and fused[top] >= self.settings.threshold
        seconds["scoring"] = seconds.get("scoring", 0.0) + time.perf_counter() - t
        return Recognition(fused, top, accepted, {c: e.keypoints for c, e in best.items()},
                           {c: e.appearance for c, e in best.items()},
                           {c: e.keypoints_all for c, e in best.items()},
                           {c: e.keypoints_subject for c, e in best.items()},
                           {c: e.appearance_raw for c, e in best.items()}, dict(seconds),
                           {c: e.view for c, e in best.items()}, len(views))

    def recognize_photo(self, image: Image.Image, candidates: Sequence[str] | None = None) -> Recognition:
        """``recognize`` on an upright photo at any resolution: the whole photo and its tiles
        (``photo_views``); when that accepts no concept, the zoom tiles too (``zoom_views``)."""
        whole, tiles = photo_views(image, self.settings)
        seconds: dict[str, float] = {}
        views = [self._view_evidence(v, seconds) for v in [whole, *tiles]]
        result = self._combine(views, candidates, seconds)
        if result.accepted or self.settings.zoom_grid < 2:
            return result
        views += [self._view_evidence(v, seconds) for v in zoom_views(image, self.settings)]
        return self._combine(views, candidates, seconds)

    def _view_evidence(self, image: np.ndarray, seconds: dict[str, float]) -> _ViewEvidence:
        """What one view contributes, whatever the concept: its keypoints' verified matches
        (inlier counts per concept and library photo) and its windows' embeddings."""
        check_stop()  # between views: a request that ended stops here (personalkv.cancellation)
        lib = self.library
        t0 = time.perf_counter()
        query = self._query_extractor().extract(image)
        t1 = time.perf_counter()
        inliers: dict[str, list[int]] = {}
        subject: dict[str, list[int]] = {}
        for m in lib.match(query):
            if m.owner >= 0:
                cid = lib.concept_ids[m.owner]
                inliers.setdefault(cid, []).append(m.inliers)
                mask = self._subject.get(m.photo)
                subject.setdefault(cid, []).append(int(mask[m.photo_idx].sum()) if mask is not None else 0)
        t2 = time.perf_counter()
        boxes = query_windows(image.shape, lib.embedder.window_fractions)
        windows = lib.embedder.embed_boxes(image, boxes) if len(boxes) else np.zeros((0, 0), np.float32)
        t3 = time.perf_counter()
        for stage, s in (("keypoints", t1 - t0), ("matching", t2 - t1), ("windows", t3 - t2)):
            seconds[stage] = seconds.get(stage, 0.0) + s
        return _ViewEvidence(inliers, subject, boxes, windows)

    def _appearance(self, cid: str, ev: _ViewEvidence, usable: np.ndarray) -> tuple[float, float, np.ndarray]:
        """(margin score, raw score, windows used) of concept ``cid`` over the usable windows:
        mean of the 3 best (best window similarity - pool similarity) of its patches."""
        emb, neg = self._patches.get(cid, (np.zeros((0, 1)), np.zeros(0)))
        if not len(emb) or emb.shape[1] != ev.windows.shape[1] or not usable.any():
            return 0.0, 0.0, np.zeros(0, int)
        sims = emb @ ev.windows[usable].T
        where = np.flatnonzero(usable)[sims.argmax(1)]
        best_sim = sims.max(1)
        top = np.argsort(best_sim - neg)[-3:]
        return float((best_sim - neg)[top].mean()), float(np.sort(best_sim)[-3:].mean()), where[top]

    def _view_scores(self, ev: _ViewEvidence, ids: Sequence[str]) -> dict[str, ConceptEvidence]:
        """Every candidate's evidence in one view. Keypoints vote for one concept each already
        (the library's ratio test across owners); windows could support two concepts that look
        alike, so concepts are taken best first and an accepted concept's windows (those its
        best patches matched) are not available to the concepts after it: a photo of one dog
        does not also show the user's other dog, while two things side by side each keep their
        own windows."""
        s = self.settings
        usable = np.ones(len(ev.boxes), bool)
        out: dict[str, ConceptEvidence] = {}
        for cid in ids:
            kp_all = float(np.log1p(sum(sorted(ev.inliers.get(cid, []))[-2:])))
            kp_subj = float(np.log1p(sum(sorted(ev.subject.get(cid, []))[-2:])))
            kp = kp_subj if s.vote_region == "subject" else kp_all
            app, raw, used = self._appearance(cid, ev, usable)
            out[cid] = ConceptEvidence(kp + s.appearance_weight * app, kp, app, kp_all, kp_subj, raw, used)
        if not s.exclusive_regions:
            return out
        pending = sorted(out, key=lambda c: -out[c].fused)
        while pending:
            cid = pending.pop(0)
            e = out[cid]
            if e.fused < s.threshold:
                break  # the rest score lower still
            claimed = box_iou(ev.boxes, ev.boxes[e.windows]).max(1) >= CLAIM_IOU if len(e.windows) else None
            if claimed is None or not claimed.any():
                continue
            usable &= ~claimed
            for other in pending:  # re-score the rest without the claimed windows
                app, raw, used = self._appearance(other, ev, usable)
                o = out[other]
                out[other] = dataclasses.replace(o, fused=o.keypoints + s.appearance_weight * app,
                                                 appearance=app, appearance_raw=raw, windows=used)
            pending.sort(key=lambda c: -out[c].fused)
        return out

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
            result = self.recognize_photo(upright(image), known)
            return {c: self.calibrated(s) for c, s in result.scores.items()}

        return rerank
