"""personalkv.images: the one decode path (EXIF orientation, RGB, downscale)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from personalkv.images import decode, downscale, rgb_array

ORIENTATION = 0x0112


def exif_jpeg_and_twin(upright: np.ndarray) -> tuple[bytes, bytes]:
    """(JPEG stored sideways with EXIF orientation 6, PNG of the same pixels physically turned
    upright). Orientation 6 means "turn the stored pixels 90 degrees clockwise to view"; the
    twin is made with numpy from the JPEG's raw decode, independently of the code under test."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    buf = io.BytesIO()
    Image.fromarray(np.rot90(upright, k=1).copy()).save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    jpeg = buf.getvalue()
    with Image.open(io.BytesIO(jpeg)) as raw:
        assert raw.getexif()[ORIENTATION] == 6
        stored = np.asarray(raw.convert("RGB"))
    out = io.BytesIO()
    Image.fromarray(np.rot90(stored, k=-1).copy()).save(out, format="PNG")
    return jpeg, out.getvalue()


def test_exif_orientation_is_applied_on_every_input_kind(tmp_path):
    upright = np.zeros((60, 90, 3), np.uint8)
    upright[:10, :30] = (255, 0, 0)  # a red mark top-left when viewed upright
    jpeg, twin = exif_jpeg_and_twin(upright)
    path = tmp_path / "phone.jpg"
    path.write_bytes(jpeg)
    want = np.asarray(decode(twin))
    assert want.shape == (60, 90, 3)
    with Image.open(io.BytesIO(jpeg)) as opened:
        pil = decode(opened)
    for got in (decode(jpeg), decode(path), pil, decode(decode(jpeg))):  # no double rotation
        assert got.mode == "RGB" and np.array_equal(np.asarray(got), want)
    assert np.asarray(decode(jpeg))[5, 10, 0] > 200  # the mark is top-left


def test_colour_modes_and_downscale():
    rgba = Image.new("RGBA", (40, 20), (10, 20, 30, 0))
    assert decode(rgba).mode == "RGB"
    assert decode(np.zeros((5, 7), np.uint8)).size == (7, 5)
    big = Image.new("RGB", (1000, 500))
    assert downscale(big, 640).size == (640, 320) and downscale(big, None) is big
    assert rgb_array(big, 100).shape == (50, 100, 3)
    with pytest.raises(TypeError):
        decode(42)
