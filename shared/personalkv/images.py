"""The one way a photo becomes pixels: decode, EXIF orientation, RGB, downscale.

Every path that looks at a photo's pixels goes through here: upload and Ask validation
(``service_layer.photos``, which decodes an uploaded photo once into a ``ValidatedPhoto`` that
every later step takes), mining and recognition (``rgb_array``, ``pixels``), retrieval keys
and the encoders (``decode``), caching (the pipeline's crops) and the evaluations. A phone
photo stored with EXIF orientation 6 is therefore upright everywhere: its mined patches, KV
chunks and index keys are those of its physically rotated twin (tests/unit/test_images.py).

``PHOTO_FORMATS`` is the one table of the formats a photo may be stored in (validation and
``storage.chunk_store`` both read it).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import ExifTags, Image, ImageOps

#: PIL format -> (media type, file extension) of the photos the object store keeps.
PHOTO_FORMATS = {
    "JPEG": ("image/jpeg", "jpg"),
    "PNG": ("image/png", "png"),
    "WEBP": ("image/webp", "webp"),
}
#: Accepted at upload, but re-encoded losslessly to PNG before storing.
CONVERTED_FORMATS = ("GIF", "BMP")


@dataclass(frozen=True)
class ValidatedPhoto:
    """An uploaded photo that passed ``service_layer.photos.validate_photo``: the bytes to store
    (the upload itself, or its PNG re-encoding) with their media type and size, and ``image``,
    the photo decoded once, upright RGB (what the model, the encoders and the recognizer see).
    ``image`` is None where validation was asked not to keep it (reference uploads: up to 32
    photos per call that nothing in the ingestion server looks at again)."""

    data: bytes
    media_type: str  # image/jpeg | image/png | image/webp (PHOTO_FORMATS)
    width: int
    height: int
    image: Image.Image | None = None


#: What may be handed to :func:`decode`: encoded bytes, a file path, a PIL image (EXIF, if it
#: still carries any, is applied) or a uint8 HxWx3 / HxW array (already pixels, used as is).
ImageLike = Union[bytes, bytearray, memoryview, str, Path, Image.Image, np.ndarray]


def decode(image: ImageLike) -> Image.Image:
    """An upright RGB PIL image: EXIF orientation applied, alpha and palettes flattened."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        with Image.open(io.BytesIO(bytes(image))) as opened:
            return upright_rgb(opened)
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            return upright_rgb(opened)
    if isinstance(image, np.ndarray):
        return Image.fromarray(np.ascontiguousarray(image).astype(np.uint8, copy=False)).convert("RGB")
    if isinstance(image, Image.Image):
        return upright_rgb(image)
    raise TypeError(f"not an image: {type(image).__name__}")


def upright(image: ImageLike) -> Image.Image:
    """``image`` itself when it already is an upright RGB PIL image (``ValidatedPhoto.image``,
    ``decode``'s result: no copy, no second decode), else :func:`decode` of it."""
    if isinstance(image, Image.Image) and image.mode == "RGB" \
            and image.getexif().get(ExifTags.Base.Orientation, 1) == 1:
        return image
    return decode(image)


def upright_rgb(image: Image.Image) -> Image.Image:
    """``image`` (opened, pixels loaded or loadable) as upright RGB: EXIF orientation applied,
    alpha and palettes flattened; a copy."""
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


def pixels(image: Image.Image, max_side: int | None = None) -> np.ndarray:
    """An already upright RGB image (``decode``'s, ``ValidatedPhoto.image``), downscaled
    (:func:`downscale`), as a writable uint8 HxWx3 array."""
    return np.asarray(downscale(image, max_side), dtype=np.uint8).copy()


def rgb_array(image: ImageLike, max_side: int | None = None) -> np.ndarray:
    """Decoded (:func:`decode`), downscaled (:func:`downscale`) uint8 HxWx3 array, writable."""
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.dtype == np.uint8 and max_side is None:
        return image.copy()
    return pixels(decode(image), max_side)


__all__ = ["CONVERTED_FORMATS", "ImageLike", "PHOTO_FORMATS", "ValidatedPhoto", "decode",
           "downscale", "pixels", "rgb_array", "upright", "upright_rgb"]
