"""CLIP / SigLIP crop embedder and text-image relevance scorer for the evidence miner.

Two things built on one contrastive image-text checkpoint (``transformers.AutoModel`` +
``AutoProcessor``: a :class:`~transformers.CLIPModel` or :class:`~transformers.SiglipModel`,
from a hub id or a local directory):

* :class:`ClipEmbedder` — a :class:`~personalkv.mining.features.PatchEmbedder` whose vectors are
  the model's projected image features (``get_image_features``), L2-normalised. Use it instead
  of the default EfficientNet-Lite embedder when a CLIP-family checkpoint is available locally
  (or in the HF cache): its features are more semantic (object identity over texture), at the
  cost of a bigger model. Configure it with ``PERSONALKV_MINING_EMBEDDER=clip:<hub id or
  path>``, e.g. ``clip:openai/clip-vit-base-patch32`` or ``clip:google/siglip-base-patch16-224``
  (and ``PERSONALKV_MINING_RELEVANCE=clip:<...>`` for the scorer below).
* :class:`ClipRelevance` — a :data:`~personalkv.mining.scoring.RelevanceScorer`: ``(crops,
  profile text) -> relevance in [0, 1]`` per crop, the ``relevance`` part of the miner's window
  score. The rescaling of the cosine ``c`` between the crop's and the text's features is:

  - SigLIP (the model has a ``logit_bias``): the model's own calibrated match probability,
    ``sigmoid(exp(logit_scale) * c + logit_bias)`` — exactly what SigLIP was trained to output
    for one image-text pair (its loss is a per-pair sigmoid), so it needs no other texts;
  - CLIP (no bias; its ``logit_scale`` only sharpens a softmax over several texts, which a single
    profile text does not have): ``(c + 1) / 2``, the affine map of [-1, 1] onto [0, 1].

  Both are strictly increasing in the cosine, so the ranking of windows is the model's.

Text is tokenised with truncation to the model's maximum length (the smaller of the
tokenizer's ``model_max_length`` and the text tower's ``max_position_embeddings``), padded to
that length for SigLIP (as it was trained, and as the transformers zero-shot pipeline does).
Crops are converted to PIL images and go through the checkpoint's own image processor (resize,
crop, normalise); an empty crop becomes a black image of the model's input size.

The model is loaded once per process and checkpoint (:func:`load_clip`), in eval mode, CPU
float32 by default; forwards hold one lock per loaded model, so embedder and scorer sharing a
checkpoint are safe to call from several threads. Nothing is downloaded in the tests: they build
tiny random CLIP and SigLIP models, tokenizers and image processors in a temporary directory and
load them through :func:`load_clip`.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from cachetools import LRUCache, cachedmethod

from personalkv.mining.features import PatchEmbedder

_TEXT_KEYS = ("input_ids", "attention_mask", "position_ids")


@dataclass(frozen=True, eq=False)
class ClipModel:
    """A loaded checkpoint: ``model`` (eval mode), its ``processor`` (``.image_processor`` and
    ``.tokenizer``) and the ``lock`` that serialises forwards through it."""

    model: Any
    processor: Any
    lock: threading.Lock
    device: torch.device
    dtype: torch.dtype

    @property
    def is_siglip(self) -> bool:
        return "siglip" in str(getattr(self.model.config, "model_type", ""))

    @property
    def image_size(self) -> int:
        size = getattr(self.model.config.vision_config, "image_size", 224)
        return int(size if isinstance(size, int) else max(size))

    @property
    def max_text_length(self) -> int:
        limits = [int(getattr(self.processor.tokenizer, "model_max_length", 0) or 0),
                  int(getattr(self.model.config.text_config, "max_position_embeddings", 0) or 0)]
        limits = [n for n in limits if 0 < n < 1_000_000]
        return min(limits) if limits else 64


def load_clip(name_or_path: str, device: str = "cpu", dtype: str = "float32") -> ClipModel:
    """The checkpoint ``name_or_path`` (hub id or local directory) with its processor, loaded
    once per process (and device, dtype), in eval mode. Works for any ``AutoModel`` exposing
    ``get_image_features`` / ``get_text_features`` (CLIP, SigLIP, ...)."""
    return _load_clip(str(name_or_path), str(device), str(dtype))  # one cache key per checkpoint


@functools.lru_cache(maxsize=None)
def _load_clip(name_or_path: str, device: str, dtype: str) -> ClipModel:
    from transformers import AutoModel, AutoProcessor

    torch_dtype = getattr(torch, dtype)
    model = AutoModel.from_pretrained(name_or_path, dtype=torch_dtype)
    if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
        raise ValueError(f"{name_or_path!r} ({type(model).__name__}) is not a CLIP-style image-text model")
    model = model.to(device).eval()
    processor = AutoProcessor.from_pretrained(name_or_path)
    return ClipModel(model, processor, threading.Lock(), torch.device(device), torch_dtype)


def _features(out: Any) -> torch.Tensor:
    """``get_*_features`` returns a tensor in transformers 4.x and a ``BaseModelOutputWithPooling``
    whose ``pooler_output`` is the projected embedding in 5.x; accept both."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None and isinstance(out, (tuple, list)):
        pooled = out[1] if len(out) > 1 else out[0]
    if pooled is None:
        raise TypeError(f"cannot find the pooled features in {type(out).__name__}")
    return pooled


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def _pil(crop: np.ndarray, side: int):
    from PIL import Image

    crop = np.asarray(crop)
    if crop.size == 0:
        crop = np.zeros((side, side, 3), np.uint8)
    if crop.ndim == 2:
        crop = np.repeat(crop[..., None], 3, axis=2)
    elif crop.shape[2] == 1:
        crop = np.repeat(crop, 3, axis=2)
    elif crop.shape[2] > 3:
        crop = crop[..., :3]
    return Image.fromarray(np.ascontiguousarray(crop.astype(np.uint8, copy=False)), "RGB")


class _ClipBase:
    def __init__(self, name_or_path: str, batch: int = 32, device: str = "cpu", dtype: str = "float32"):
        self.name_or_path = name_or_path
        self.batch = max(1, int(batch))
        self._clip = load_clip(name_or_path, device, dtype)

    @property
    def model(self) -> Any:
        return self._clip.model

    @property
    def processor(self) -> Any:
        return self._clip.processor

    def _image_inputs(self, crops: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        side = self._clip.image_size
        inputs = self.processor.image_processor(images=[_pil(c, side) for c in crops], return_tensors="pt")
        return {k: (v.to(self._clip.device, self._clip.dtype) if v.is_floating_point() else v.to(self._clip.device))
                for k, v in inputs.items() if isinstance(v, torch.Tensor)}

    def _image_features(self, crops: Sequence[np.ndarray]) -> torch.Tensor:
        """(n, d) L2-normalised float32 image features (CPU), in batches of ``self.batch``."""
        out = []
        with torch.inference_mode(), self._clip.lock:
            for i in range(0, len(crops), self.batch):
                feats = _features(self.model.get_image_features(**self._image_inputs(crops[i:i + self.batch])))
                out.append(_normalise(feats).cpu())
        return torch.cat(out)

    def text_inputs(self, text: str) -> dict[str, torch.Tensor]:
        """The tokenised ``text``: truncated to the model's maximum length, padded to it for
        SigLIP."""
        length = self._clip.max_text_length
        tok = self.processor.tokenizer(
            [text], truncation=True, max_length=length,
            padding="max_length" if self._clip.is_siglip else True, return_tensors="pt",
        )
        inputs = {k: tok[k] for k in _TEXT_KEYS if k in tok}
        if inputs["input_ids"].shape[1] == 0:  # empty text and a tokenizer without BOS / EOS
            t = self.processor.tokenizer
            token = next((i for i in (t.eos_token_id, t.pad_token_id, t.unk_token_id) if i is not None), 0)
            inputs = {"input_ids": torch.tensor([[token]])}
            if "attention_mask" in tok:
                inputs["attention_mask"] = torch.ones(1, 1, dtype=tok["attention_mask"].dtype)
        return {k: v.to(self._clip.device) for k, v in inputs.items()}

    def _text_features(self, text: str) -> torch.Tensor:
        with torch.inference_mode(), self._clip.lock:
            return _normalise(_features(self.model.get_text_features(**self.text_inputs(text)))).cpu()[0]


class ClipEmbedder(_ClipBase, PatchEmbedder):
    """``embed(crops) -> (n, d)`` L2-normalised float32 CLIP / SigLIP image features."""

    name = "clip"

    def __init__(self, name_or_path: str, batch: int = 32, device: str = "cpu", dtype: str = "float32"):
        super().__init__(name_or_path, batch, device, dtype)

    @property
    def dim(self) -> int:
        cfg = self.model.config
        dim = getattr(cfg, "projection_dim", None)
        return int(dim) if dim else int(cfg.vision_config.hidden_size)

    def embed(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        if not len(crops):
            return np.zeros((0, self.dim), np.float32)
        return self._image_features(list(crops)).numpy().astype(np.float32, copy=False)


class ClipRelevance(_ClipBase):
    """``(crops, text) -> (n,)`` relevance in [0, 1]: SigLIP's calibrated probability
    ``sigmoid(exp(logit_scale) * cos + logit_bias)``, or ``(cos + 1) / 2`` for CLIP (see the
    module docstring). Text features are cached per text (the profile text recurs)."""

    def __init__(self, name_or_path: str, batch: int = 32, device: str = "cpu", dtype: str = "float32",
                 text_cache: int = 32):
        super().__init__(name_or_path, batch, device, dtype)
        self._text_cache = LRUCache(maxsize=text_cache)  # 0: nothing kept
        self._cache_lock = threading.Lock()

    @cachedmethod(lambda self: self._text_cache, lock=lambda self: self._cache_lock)
    def text_features(self, text: str) -> torch.Tensor:
        """The text's features, computed outside the cache lock, cached per text (LRU)."""
        return self._text_features(text)

    def rescale(self, cos: np.ndarray) -> np.ndarray:
        """The documented map of cosines onto [0, 1] (strictly increasing)."""
        cos = np.asarray(cos, np.float64)
        bias = getattr(self.model, "logit_bias", None)
        if bias is not None:
            scale = float(self.model.logit_scale.detach().float().exp().reshape(-1)[0])
            logits = scale * cos + float(bias.detach().float().reshape(-1)[0])
            rel = 1.0 / (1.0 + np.exp(-logits))
        else:
            rel = (cos + 1.0) / 2.0
        return np.clip(rel, 0.0, 1.0).astype(np.float32)

    def cosine(self, crops: Sequence[np.ndarray], text: str) -> np.ndarray:
        """(n,) cosine between each crop's and the text's features."""
        if not len(crops):
            return np.zeros(0, np.float32)
        return (self._image_features(list(crops)) @ self.text_features(text)).numpy().astype(np.float32)

    def __call__(self, crops: Sequence[np.ndarray], text: str) -> np.ndarray:
        return self.rescale(self.cosine(crops, text))


def make_clip_embedder(name_or_path: str) -> ClipEmbedder:
    return ClipEmbedder(name_or_path)


def make_clip_relevance(name_or_path: str) -> ClipRelevance:
    return ClipRelevance(name_or_path)
