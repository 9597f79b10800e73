"""Checking uploaded photos before anything stores or decodes them.

Called by ``concepts.add_photos`` (reference photos) and ``answering.ask`` (the question's
photo). Order of checks, cheapest and safest first: size in bytes, then the header only (format
and dimensions; PIL reads no pixels in ``Image.open``), then the pixel budget, and only then a
full decode (which catches truncated or corrupt data). Formats outside what the object store
keeps (JPEG, PNG, WebP) are re-encoded losslessly to PNG; HEIC/AVIF/TIFF/... are refused.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from personalkv.images import decode

from personalkv.service_layer.errors import InvalidArgument, ResourceExhausted

#: PIL format -> media type, stored as is.
STORED_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
#: Accepted, but re-encoded to PNG before storing.
CONVERTED_FORMATS = {"GIF", "BMP"}
ACCEPTED = sorted(set(STORED_FORMATS) | CONVERTED_FORMATS)


@dataclass(frozen=True)
class ValidatedPhoto:
    data: bytes  # the bytes to store (the upload itself, or its PNG re-encoding)
    media_type: str  # image/jpeg | image/png | image/webp
    width: int
    height: int

    def to_pil(self) -> Image.Image:
        """RGB image with EXIF orientation applied (what the model and the encoders see)."""
        return decode(self.data)


def validate_photo(data: bytes, *, max_bytes: int, max_pixels: int) -> ValidatedPhoto:
    """Return the photo to store, or raise InvalidArgument / ResourceExhausted (see module)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidArgument(f"a photo must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise InvalidArgument("the photo is empty (0 bytes)")
    if len(data) > max_bytes:
        raise ResourceExhausted(f"the photo is {len(data)} bytes; the limit is {max_bytes}")
    try:
        # Header only: format and size, no pixel data decoded yet.
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # PIL's own header check (> 2x its limit)
        raise ResourceExhausted(f"the photo has too many pixels: {exc}") from None
    except UnidentifiedImageError:
        raise InvalidArgument(f"not a readable image; accepted formats: {', '.join(ACCEPTED)}") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidArgument(f"not a readable image ({exc})") from None
    with image:
        fmt = image.format
        if fmt not in STORED_FORMATS and fmt not in CONVERTED_FORMATS:
            raise InvalidArgument(f"image format {fmt} is not accepted; use one of {', '.join(ACCEPTED)}")
        width, height = image.size
        if width <= 0 or height <= 0:
            raise InvalidArgument(f"image has no pixels ({width}x{height})")
        if width * height > max_pixels:
            raise ResourceExhausted(
                f"the photo is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image.load()  # full decode: truncated / corrupt data fails here
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ResourceExhausted(f"the photo is {width}x{height}; too many pixels") from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise InvalidArgument(f"the {fmt} image is corrupt or truncated ({exc})") from None
        if fmt in STORED_FORMATS:
            return ValidatedPhoto(data, STORED_FORMATS[fmt], width, height)
        frame = image.convert("RGBA" if "A" in image.getbands() or "transparency" in image.info else "RGB")
    out = io.BytesIO()
    frame.save(out, format="PNG")
    return ValidatedPhoto(out.getvalue(), "image/png", width, height)


__all__ = ["ACCEPTED", "ValidatedPhoto", "validate_photo"]
