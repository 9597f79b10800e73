"""Mining backends by name: the one place that maps ``MiningSettings.extractor`` /
``.embedder`` / ``.subject_prior`` to an implementation.

Backends are imported lazily (only the configured one loads torch, weights or transformers);
an unknown name fails with the list of known ones. Plug in your own with
``register_local_extractor`` / ``register_patch_embedder`` / ``register_subject_prior`` before
the miner is built.
"""

from __future__ import annotations

from typing import Callable

from personalkv.mining.features import (
    ColourEmbedder, LocalFeatureExtractor, PatchEmbedder, SiftExtractor,
)
from personalkv.mining.saliency import SpectralResidualPrior, SubjectPrior, UniformPrior

_LOCAL: dict[str, Callable[[], LocalFeatureExtractor]] = {"sift": SiftExtractor}
_PRIORS: dict[str, Callable[[], SubjectPrior]] = {
    "saliency": SpectralResidualPrior,
    "none": UniformPrior,
}


def _efficientnet(variant: str) -> Callable[..., PatchEmbedder]:
    def make(window_scales: int = 0, window_split: int = 16) -> PatchEmbedder:
        from personalkv.mining.efficientnet import EfficientNetLiteEmbedder  # torch loads lazily

        return EfficientNetLiteEmbedder(variant, window_scales=window_scales, window_split=window_split)

    return make


#: CNN embedders that can pool windows from whole-photo feature maps (``window_scales``)
_POOLING = {"efficientnet-lite0", "efficientnet-lite2"}

_EMBEDDERS: dict[str, Callable[[], PatchEmbedder]] = {
    "colour": ColourEmbedder,
    "efficientnet-lite0": _efficientnet("lite0"),
    "efficientnet-lite2": _efficientnet("lite2"),
}


def register_local_extractor(name: str, factory: Callable[[], LocalFeatureExtractor]) -> None:
    _LOCAL[name] = factory


def register_patch_embedder(name: str, factory: Callable[[], PatchEmbedder]) -> None:
    """E.g. ``register_patch_embedder("dinov2", lambda: MyDinoEmbedder(path))``."""
    _EMBEDDERS[name] = factory


def register_subject_prior(name: str, factory: Callable[[], SubjectPrior]) -> None:
    """E.g. a person segmenter or an open-vocabulary detector behind ``SubjectPrior.prior``."""
    _PRIORS[name] = factory


def _build(table: dict, what: str, name: str, known: list[str] | None = None):
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; known: {known or sorted(table)}")
    return table[name]()


def get_local_extractor(name: str) -> LocalFeatureExtractor:
    return _build(_LOCAL, "local extractor", name)


def get_subject_prior(name: str) -> SubjectPrior:
    return _build(_PRIORS, "subject prior", name)


def get_patch_embedder(name: str, adapter=None, window_scales: int = 0, window_split: int = 16) -> PatchEmbedder:
    """A registered name, ``clip:<hub id or path>`` for a CLIP / SigLIP checkpoint, or ``vlm``:
    the answering model's own vision tower, i.e. ``adapter`` (the process's one model adapter,
    or a callable returning it, from ``personalkv.bootstrap``; never loaded here).
    ``window_scales`` / ``window_split`` (``MiningSettings``): the EfficientNet embedders cut
    windows out of that many whole-photo feature maps after that block (0 scales: one forward
    per window crop); other embedders ignore them."""
    if name in _POOLING:
        return _EMBEDDERS[name](window_scales, window_split)
    if name == "vlm":
        if adapter is None:
            raise ValueError("the 'vlm' patch embedder is the answering model's vision tower: "
                             "pass the process's model adapter")
        from personalkv.mining.vision_tower import VisionTowerEmbedder

        return VisionTowerEmbedder(adapter() if callable(adapter) else adapter)
    if name.startswith("clip:"):
        from personalkv.mining.clip import make_clip_embedder

        return make_clip_embedder(name.removeprefix("clip:"))
    return _build(_EMBEDDERS, "patch embedder", name, known=sorted([*_EMBEDDERS, "vlm"]))
