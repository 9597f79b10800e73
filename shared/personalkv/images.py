"""The one way a photo becomes pixels: decode, EXIF orientation, RGB, downscale.

Every path that looks at a photo's pixels goes through here: upload validation
(``service_layer.photos``), mining and recognition (``mining.features.load_rgb``,
``mining.incremental``), retrieval keys and the Ask photo (``retrieval.encoders.to_pil``), caching
(the pipeline's crops) and the evaluations. A phone photo stored with EXIF orientation 6 is
therefore upright everywhere: its mined patches, KV chunks and index keys are those of its
physically rotated twin (tests/unit/test_images.py).

Validation's header-only check (``Image.open`` without decoding, to refuse decompression
bombs) is not a decode and stays in ``service_layer.photos``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps

#: What may be handed to :func:`decode`: encoded bytes, a file path, a PIL image (EXIF, if it
#: still carries any, is applied) or a uint8 HxWx3 / HxW array (already pixels, used as is).
ImageLike = Union[bytes, bytearray, memoryview, str, Path, Image.Image, np.ndarray]


def decode(image: ImageLike) -> Image.Image:
    """An upright RGB PIL image: EXIF orientation applied, alpha and palettes flattened."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        with Image.open(io.BytesIO(bytes(image))) as opened:
            return _upright_rgb(opened)
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            return _upright_rgb(opened)
    if isinstance(image, np.ndarray):
        return Image.fromarray(np.ascontiguousarray(image).astype(np.uint8, copy=False)).convert("RGB")
    if isinstance(image, Image.Image):
        return _upright_rgb(image)
    raise TypeError(f"not an image: {type(image).__name__}")


def _upright_rgb(image: Image.Image) -> Image.Image:
    # exif_transpose drops the orientation tag from what it returns, so decoding an already
    # decoded image is a no-op (no double rotation).
    return ImageOps.exif_transpose(image).convert("RGB")  # convert copies: the caller may close


def downscale(image: Image.Image, max_side: int | None) -> Image.Image:
    """``image`` shrunk (bilinear, aspect kept) so that its longer side is at most
    ``max_side``; the same object when it already fits or ``max_side`` is None."""
    if max_side is None or max(image.size) <= max_side:
        return image
    small = image.copy()
    small.thumbnail((max_side, max_side), Image.BILINEAR)
    return small


def rgb_array(image: ImageLike, max_side: int | None = None) -> np.ndarray:
    """Decoded (:func:`decode`), downscaled (:func:`downscale`) uint8 HxWx3 array, writable."""
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.dtype == np.uint8 and max_side is None:
        return image.copy()
    return np.asarray(downscale(decode(image), max_side), dtype=np.uint8).copy()


__all__ = ["ImageLike", "decode", "downscale", "rgb_array"]
