"""Checking uploaded photos before anything stores or decodes them.

Called by ``concepts.add_photos`` (reference photos) and ``answering.ask`` (the question's
photo). Order of checks, cheapest and safest first: size in bytes, then the header only (format
and dimensions; PIL reads no pixels in ``Image.open``), then the pixel budget, and only then a
full decode (which catches truncated or corrupt data). That decode is the photo's only one: the
``ValidatedPhoto`` carries it, upright RGB, to every later step (the Ask's retriever, recognizer
and model; the upload's store write). Formats outside what the object store keeps
(``images.PHOTO_FORMATS``: JPEG, PNG, WebP) are re-encoded losslessly to PNG; HEIC/AVIF/TIFF/...
are refused.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from personalkv.images import CONVERTED_FORMATS, PHOTO_FORMATS, ValidatedPhoto, upright_rgb
from personalkv.service_layer.errors import InvalidArgument, ResourceExhausted

ACCEPTED = sorted({*PHOTO_FORMATS, *CONVERTED_FORMATS})


def validate_photo(data: bytes, *, max_bytes: int, max_pixels: int,
                   keep_image: bool = True) -> ValidatedPhoto:
    """Return the photo to store, or raise InvalidArgument / ResourceExhausted (see module).
    ``keep_image``: carry the decoded upright image (an Ask's photo); False for uploads, whose
    pixels the ingestion server never looks at again (32 decoded photos held at once would
    cost over a GB)."""
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
        if fmt not in PHOTO_FORMATS and fmt not in CONVERTED_FORMATS:
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
        upright = upright_rgb(image) if keep_image else None  # the pixels just decoded
        if fmt in PHOTO_FORMATS:
            return ValidatedPhoto(data, PHOTO_FORMATS[fmt][0], width, height, upright)
        frame = image.convert("RGBA" if "A" in image.getbands() or "transparency" in image.info else "RGB")
    out = io.BytesIO()
    frame.save(out, format="PNG")
    return ValidatedPhoto(out.getvalue(), "image/png", width, height, upright)


__all__ = ["ACCEPTED", "ValidatedPhoto", "validate_photo"]
