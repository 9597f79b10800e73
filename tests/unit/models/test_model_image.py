"""``ModelAdapter.model_image``: any photo validation accepts reaches the vision tower in a
shape its processor takes (padded to at most MAX_IMAGE_ASPECT, short side at least
MIN_IMAGE_SIDE, content centred and unsqueezed), and ``encode_image`` of every image adapter
takes the extremes (issue 20: Qwen2-VL refused an aspect ratio of 200 or more). The whole path
(upload -> mining -> caching -> Ask) with these shapes: tests/unit/service_layer/test_extreme_photos.py."""

from __future__ import annotations

import pytest
from PIL import Image

from personalkv.models.base import MAX_IMAGE_ASPECT, MIN_IMAGE_SIDE

EXTREMES = [(1, 201), (201, 1), (10, 2010), (20000, 1), (1, 1), (199, 1), (200, 1), (3, 60)]
BLUE = (40, 90, 200)


@pytest.mark.parametrize("size", EXTREMES)
def test_model_image_has_a_shape_every_processor_takes(tiny, size):
    adapter = tiny("qwen2_vl")
    out = adapter.model_image(Image.new("RGB", size, BLUE))
    width, height = out.size
    assert max(width, height) <= MAX_IMAGE_ASPECT * min(width, height)
    assert min(width, height) >= MIN_IMAGE_SIDE
    # The photo is in it, not only padding: resampling blends a 1-pixel line with the grey
    # (128), so its blue channel (200) is asked to stay well above the grey, not exact.
    assert out.getextrema()[2][1] >= 160


def test_padding_keeps_the_photo_unsqueezed():
    from personalkv.models.base import ModelAdapter

    strip = Image.new("RGB", (1000, 10), BLUE)  # 100:1 -> padded to 1000x50, no resize
    out = ModelAdapter.model_image(type("A", (), {"max_image_pixels": None})(), strip)
    assert out.size == (1000, 50)
    rows = [out.getpixel((500, y)) for y in range(50)]
    assert rows[20:30] == [BLUE] * 10 and set(rows[:20] + rows[30:]) == {(128, 128, 128)}


def test_a_photo_within_the_limits_is_untouched(tiny):
    image = Image.new("RGB", (640, 480), BLUE)
    assert tiny("qwen2_vl").model_image(image).size == (640, 480)


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl", "llava_onevision"])
@pytest.mark.parametrize("size", EXTREMES)
def test_every_image_adapter_encodes_the_extremes(tiny, kind, size):
    encoded = tiny(kind).encode_image(Image.new("RGB", size, BLUE))
    assert encoded.embeds.shape[0] > 0 and encoded.embeds.isfinite().all()
