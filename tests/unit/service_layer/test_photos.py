"""validate_photo: every refusal the upload path needs, and the formats it converts."""

from __future__ import annotations

import io
import struct
import time
import zlib

import pytest
from personalkv.errors import InvalidArgument, ResourceExhausted
from personalkv.service_layer.photos import validate_photo
from PIL import Image

LIMITS = dict(max_bytes=2_000_000, max_pixels=4_000_000)


def encode(fmt: str, size=(64, 48), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (10, 120, 200) if mode == "RGB" else 3).save(buf, format=fmt)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (the data is a 1x1 image's): a bomb."""
    data = encode("PNG", (1, 1))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    start = 8  # after the signature: length(4) IHDR(4) data(13) crc(4)
    return data[:start] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) \
        + data[start + 25:]


@pytest.mark.parametrize("fmt,media", [("JPEG", "image/jpeg"), ("PNG", "image/png"),
                                       ("WEBP", "image/webp")])
def test_stored_formats_pass_unchanged(fmt, media):
    data = encode(fmt)
    photo = validate_photo(data, **LIMITS)
    assert (photo.data, photo.media_type, photo.width, photo.height) == (data, media, 64, 48)


@pytest.mark.parametrize("fmt,mode", [("GIF", "P"), ("BMP", "RGB")])
def test_gif_and_bmp_are_normalised_to_png(fmt, mode):
    photo = validate_photo(encode(fmt, mode=mode), **LIMITS)
    assert photo.media_type == "image/png"
    assert Image.open(io.BytesIO(photo.data)).format == "PNG"
    assert (photo.width, photo.height) == (64, 48)


def test_zero_bytes_refused():
    with pytest.raises(InvalidArgument, match="empty"):
        validate_photo(b"", **LIMITS)


def test_garbage_refused():
    with pytest.raises(InvalidArgument, match="not a readable image"):
        validate_photo(b"\x00\x01 definitely not an image" * 10, **LIMITS)


def test_truncated_image_refused():
    data = encode("PNG", (300, 200))
    with pytest.raises(InvalidArgument):
        validate_photo(data[: len(data) // 2], **LIMITS)


def test_heic_refused():
    # An ISO-BMFF 'ftyp' box with the heic brand: what an iPhone sends.
    heic = struct.pack(">I", 24) + b"ftypheic" + b"\x00\x00\x00\x00" + b"mif1heic" + b"\x00" * 64
    with pytest.raises(InvalidArgument):
        validate_photo(heic, **LIMITS)


def test_tiff_refused_as_unsupported_format():
    with pytest.raises(InvalidArgument, match="not accepted"):
        validate_photo(encode("TIFF"), **LIMITS)


def test_too_many_bytes_is_resource_exhausted():
    with pytest.raises(ResourceExhausted, match="bytes"):
        validate_photo(encode("PNG"), max_bytes=100, max_pixels=10**9)


def test_decompression_bomb_refused_from_the_header():
    bomb = png_claiming(30000, 30000)
    assert len(bomb) < 200
    started = time.perf_counter()
    with pytest.raises(ResourceExhausted, match="pixels"):
        validate_photo(bomb, **LIMITS)
    assert time.perf_counter() - started < 0.5  # no pixel was decoded


def test_pixel_limit_checked_before_decoding():
    bomb = png_claiming(3000, 2000)  # under PIL's own limit, over ours
    with pytest.raises(ResourceExhausted, match="3000x2000"):
        validate_photo(bomb, max_bytes=10**6, max_pixels=1_000_000)


def test_not_bytes_refused():
    with pytest.raises(InvalidArgument):
        validate_photo("a string", **LIMITS)  # type: ignore[arg-type]


def jpeg_claiming(width: int, height: int) -> bytes:
    """A complete 16x16 baseline JPEG (about 630 bytes, end-of-image marker included) whose
    frame header is rewritten to claim width x height: libjpeg decodes it without an error."""
    data = bytearray(encode("JPEG", (16, 16)))
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def test_jpeg_too_short_for_its_header_is_refused_as_truncated():
    data = jpeg_claiming(6000, 6000)
    assert len(data) < 700
    with pytest.raises(InvalidArgument, match="JPEG image is truncated.*6000x6000"):
        validate_photo(data, max_bytes=10**6, max_pixels=40_000_000)


@pytest.mark.parametrize("mode,progressive", [("L", True), ("RGB", False)])
def test_flat_jpegs_at_the_lowest_quality_pass_the_truncation_bound(mode, progressive):
    # The most compressible real JPEGs (one colour, quality 1, optimized tables) are ~32x
    # above the bound (47 KB for 4000x3000 grey, the bound 1.5 KB): no false refusals.
    buf = io.BytesIO()
    Image.new(mode, (4000, 3000), 0).save(buf, "JPEG", quality=1, optimize=True,
                                          progressive=progressive)
    photo = validate_photo(buf.getvalue(), max_bytes=10**7, max_pixels=20_000_000, keep_image=False)
    assert (photo.width, photo.height) == (4000, 3000)


def test_bmp_with_a_negative_width_is_invalid_not_too_large():
    data = bytearray(encode("BMP", (100, 100)))
    data[18:22] = struct.pack("<i", -100)  # BITMAPINFOHEADER width; PIL reads it unsigned
    with pytest.raises(InvalidArgument, match="header is malformed.*4294967196x100"):
        validate_photo(bytes(data), **LIMITS)


def test_a_bomb_refused_by_pil_names_its_size():
    with pytest.raises(ResourceExhausted, match="30000x30000 = 900000000 pixels"):
        validate_photo(png_claiming(30000, 30000), **LIMITS)
