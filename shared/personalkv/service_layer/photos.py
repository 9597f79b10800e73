"""Checking uploaded photos before anything stores or decodes them.

Called by ``concepts.add_photos`` (reference photos) and ``answering.ask`` (the question's
photo). Order of checks, cheapest and safest first: size in bytes, then the header only (format
and dimensions; PIL reads no pixels in ``Image.open``), then the pixel budget, then whether a
JPEG's bytes could hold the pixels its header claims, and only then a full decode (which
catches truncated or corrupt data). A header no real image has (a side of 2**31 or more: a BMP's
negative width read as unsigned) is invalid, not large. That decode is the photo's only one: the
``ValidatedPhoto`` carries it, upright RGB, to every later step (the Ask's retriever, recognizer
and model; the upload's store write). Formats outside what the object store keeps
(``images.PHOTO_FORMATS``: JPEG, PNG, WebP) are re-encoded losslessly to PNG; HEIC/AVIF/TIFF/...
are refused.
"""

from __future__ import annotations

import io
import math
import struct
import warnings

from PIL import Image, UnidentifiedImageError

from personalkv.images import CONVERTED_FORMATS, PHOTO_FORMATS, ValidatedPhoto, upright_rgb
from personalkv.errors import InvalidArgument, ResourceExhausted

ACCEPTED = sorted({*PHOTO_FORMATS, *CONVERTED_FORMATS})
#: No accepted format can store a side this long (PNG and BMP hold signed 32-bit sizes, JPEG
#: and GIF 16-bit, WebP 14-bit): a header claiming one is malformed, not merely too large.
IMPOSSIBLE_SIDE = 2**31
#: Huffman-coded JPEG frames (SOF0-3, SOF5-7); SOF9-15 are arithmetic-coded.
_HUFFMAN_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7})


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
    except Image.DecompressionBombError:  # PIL's own header check (> 2x its limit)
        width, height = _claimed_size(data)
        _check_sides(width, height)
        raise ResourceExhausted(
            f"the photo is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        ) from None
    except UnidentifiedImageError:
        raise InvalidArgument(f"not a readable image; accepted formats: {', '.join(ACCEPTED)}") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidArgument(f"not a readable image ({exc})") from None
    with image:
        fmt = image.format
        if fmt not in PHOTO_FORMATS and fmt not in CONVERTED_FORMATS:
            raise InvalidArgument(f"image format {fmt} is not accepted; use one of {', '.join(ACCEPTED)}")
        width, height = image.size
        _check_sides(width, height)
        if width * height > max_pixels:
            raise ResourceExhausted(
                f"the photo is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
            )
        if fmt == "JPEG":
            _check_jpeg_holds(data, width, height)
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


def _check_sides(width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise InvalidArgument(f"image has no pixels ({width}x{height})")
    if max(width, height) >= IMPOSSIBLE_SIDE:
        raise InvalidArgument(f"the image header is malformed: it claims {width}x{height} pixels")


def _claimed_size(data: bytes) -> tuple[int, int]:
    """The size the header claims, read by PIL's own format plugin without ``Image.open``'s
    bomb check (which reports a pixel count only). (0, 0) when no accepted plugin reads it."""
    Image.init()
    for fmt in ACCEPTED:
        factory, accept = Image.OPEN[fmt]
        try:
            if accept is None or accept(data[:16]):
                with factory(io.BytesIO(data), None) as image:
                    return image.size
        except Exception:  # noqa: BLE001 - any plugin's refusal just means "not this format"
            continue
    return 0, 0


def _check_jpeg_holds(data: bytes, width: int, height: int) -> None:
    """Refuse a Huffman-coded JPEG too short for the pixels its header claims. libjpeg decodes
    such a file without an error (it stops at the end-of-image marker and fills the rest in
    grey), so the decode below would not catch it. Every 8x8 block of every component costs at
    least one Huffman code of at least one bit, and with sampling factors of at most 4 a block
    covers at most 32x32 pixels: a real JPEG has at least ceil(w/32) * ceil(h/32) bits of scan
    data, far below any encoder's output (a flat 6000x6000 JPEG at quality 5 is 0.5 MB, the
    bound 4.4 KB). Arithmetic-coded JPEGs can be smaller and are left to the decoder."""
    if _jpeg_frame_marker(data) not in _HUFFMAN_SOF:
        return
    least = math.ceil(width / 32) * math.ceil(height / 32) // 8
    if len(data) < least:
        raise InvalidArgument(
            f"the JPEG image is truncated: its header claims {width}x{height} pixels, which "
            f"take at least {least} bytes; it has {len(data)}")


def _jpeg_frame_marker(data: bytes) -> int | None:
    """The second byte of the JPEG's start-of-frame marker (0xC0 baseline, ...), or None."""
    at = 2  # after SOI
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # DHT, JPG, DAC
            return marker
        (length,) = struct.unpack(">H", data[at + 2:at + 4])
        at += 2 + length
    return None


__all__ = ["ACCEPTED", "ValidatedPhoto", "validate_photo"]
