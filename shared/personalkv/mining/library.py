"""The photos a miner or recognizer compares against, with their features and one keypoint index.

A ``PhotoLibrary`` holds every photo of one user's concepts plus a negative pool (generic
photos), each photo's local features and the appearance embedding of its candidate windows. ``build()`` makes one approximate
nearest-neighbour index (FLANN kd-trees) over all keypoints, labelled by owner (concept index,
or -1 for the negative pool). ``match()`` is the one matching rule used by both mining and
recognition: a query keypoint is a match for owner ``o`` when its nearest neighbour belongs
to ``o`` and is closer than ``ratio`` times the nearest neighbour of any *other* owner
(Lowe's ratio test across owners), so features shared with the pool or with the user's other
concepts (home backgrounds) vote for nobody. Matches are then verified per library photo with
a RANSAC similarity transform; only inliers count.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from personalkv.mining.features import LocalFeatureExtractor, LocalFeatures, PatchEmbedder
from personalkv.mining.proposals import propose_boxes

NEGATIVE = -1


@dataclass
class LibraryPhoto:
    owner: int  # concept index, or NEGATIVE
    photo_id: str
    shape: tuple[int, int]
    local: LocalFeatures
    boxes: np.ndarray  # candidate windows (n, 4)
    appearance: np.ndarray  # their embeddings by the library's PatchEmbedder (n, d)


@dataclass
class PhotoMatches:
    """Geometrically verified matches of one query image against one library photo."""

    photo: int
    owner: int
    query_idx: np.ndarray  # inlier keypoint indices in the query
    photo_idx: np.ndarray  # corresponding keypoint indices in the library photo

    @property
    def inliers(self) -> int:
        return int(self.query_idx.size)


@dataclass
class PhotoLibrary:
    extractor: LocalFeatureExtractor
    embedder: PatchEmbedder
    ratio: float = 0.85
    ransac_px: float = 8.0
    min_inliers: int = 4
    photos: list[LibraryPhoto] = field(default_factory=list)
    concept_ids: list[str] = field(default_factory=list)
    #: optional memo of described photos by photo id (evaluations rebuild libraries from the
    #: same photos; ids must then be unique, e.g. paths). The service passes the stored
    #: descriptors (``personalkv.mining.descriptors.StoredDescriptors``).
    cache: dict | None = None

    def describe(self, image, owner: int, photo_id: str) -> LibraryPhoto:
        """``image``: a uint8 RGB array, or a zero-argument callable returning one (called only
        when the cache does not hold the photo: its pixels need not be fetched at all)."""
        if self.cache is not None and photo_id in self.cache:
            shape, local, boxes, appearance = self.cache[photo_id]
        else:
            if callable(image):
                image = image()
            boxes = propose_boxes(image.shape, self.embedder.window_fractions)
            shape, local = image.shape[:2], self.extractor.extract(image)
            appearance = self.embedder.embed_boxes(image, boxes)
            if self.cache is not None:
                self.cache[photo_id] = (shape, local, boxes, appearance)
                # as the cache keeps it (a store may round), so cached and fresh score alike
                shape, local, boxes, appearance = self.cache[photo_id]
        return LibraryPhoto(owner, photo_id, shape, local, boxes, appearance)

    def add_concept(self, concept_id: str, images, photo_ids=None) -> int:
        owner = len(self.concept_ids)
        self.concept_ids.append(concept_id)
        for i, image in enumerate(images):
            pid = photo_ids[i] if photo_ids is not None else f"{concept_id}/{i}"
            self.photos.append(self.describe(image, owner, pid))
        return owner

    def add_negatives(self, images, photo_ids=None) -> None:
        for i, image in enumerate(images):
            pid = photo_ids[i] if photo_ids is not None else f"negative/{i}"
            self.photos.append(self.describe(image, NEGATIVE, pid))

    def photos_of(self, owner: int) -> list[int]:
        return [i for i, p in enumerate(self.photos) if p.owner == owner]

    def build(self) -> None:
        descs = [p.local.desc for p in self.photos]
        self._desc_owner = np.concatenate([np.full(len(p.local), p.owner) for p in self.photos] + [np.zeros(0, int)])
        self._desc_photo = np.concatenate([np.full(len(p.local), i) for i, p in enumerate(self.photos)] + [np.zeros(0, int)])
        self._desc_local = np.concatenate([np.arange(len(p.local)) for p in self.photos] + [np.zeros(0, int)])
        self._flann = cv2.FlannBasedMatcher({"algorithm": 1, "trees": 4}, {"checks": 64})
        if self._desc_owner.size:
            self._flann.add([np.concatenate(descs).astype(np.float32)])
            # The randomised kd-trees draw from OpenCV's (thread-local) RNG, whose state any
            # earlier cv2 call moves: seed it so that the same photos always give the same
            # neighbours, patches and scores, whatever ran before in this thread.
            cv2.setRNGSeed(0)
            self._flann.train()

    def match(self, query: LocalFeatures, exclude_photo: int | None = None, k: int = 8,
              nearest: np.ndarray | None = None) -> list[PhotoMatches]:
        """Verified matches of ``query`` against every library photo that gets any (see module doc).
        ``exclude_photo`` leaves one library photo out (mining matches a photo against the rest).
        ``nearest``, when given (len(query) ints), receives each keypoint's nearest owner (or -2)."""
        if nearest is not None:
            nearest[:] = -2
        if len(query) < self.min_inliers or not self._desc_owner.size:
            return []
        kk = k + (1 if exclude_photo is not None else 0)
        knn = self._flann.knnMatch(query.desc.astype(np.float32), k=min(kk, self._desc_owner.size))
        votes: dict[int, dict[int, int]] = {}
        for qi, neighbours in enumerate(knn):
            hits = [m for m in neighbours if self._desc_photo[m.trainIdx] != exclude_photo]
            if not hits:
                continue
            owner = self._desc_owner[hits[0].trainIdx]
            if nearest is not None:
                nearest[qi] = owner
            rival = next((m.distance for m in hits if self._desc_owner[m.trainIdx] != owner), None)
            if rival is None:
                rival = hits[-1].distance * 1.05
            if owner == NEGATIVE or hits[0].distance >= self.ratio * rival:
                continue
            for m in hits:  # every same-owner neighbour before the rival votes for its photo
                if self._desc_owner[m.trainIdx] != owner:
                    break
                votes.setdefault(int(self._desc_photo[m.trainIdx]), {}).setdefault(qi, int(self._desc_local[m.trainIdx]))
        out = []
        for photo, pairs in votes.items():
            if len(pairs) < self.min_inliers:
                continue
            qidx = np.fromiter(pairs.keys(), int)
            pidx = np.fromiter(pairs.values(), int)
            mask = verify(query.xy[qidx], self.photos[photo].local.xy[pidx], self.ransac_px)
            if mask.sum() >= self.min_inliers:
                out.append(PhotoMatches(photo, self.photos[photo].owner, qidx[mask], pidx[mask]))
        return out


def add_photos(library: PhotoLibrary, images, owner: int, photo_ids) -> None:
    for image, pid in zip(images, photo_ids):
        library.photos.append(library.describe(image, owner, pid))


def verify(src: np.ndarray, dst: np.ndarray, px: float) -> np.ndarray:
    """RANSAC similarity transform (rotation, scale, translation): boolean inlier mask. A
    similarity is stricter than a homography, so chance inliers from clutter are rarer."""
    if len(src) < 3:
        return np.zeros(len(src), bool)
    _, mask = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=px,
                                          maxIters=2000, confidence=0.99)
    return np.zeros(len(src), bool) if mask is None else mask.ravel().astype(bool)
