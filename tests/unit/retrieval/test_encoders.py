"""Encoders: unit-norm rows, stable output, lazy registry, MiniLM loads offline."""

from __future__ import annotations

import numpy as np
import pytest

from personalkv.images import decode
from personalkv.retrieval.encoders import (
    GlobalDescriptorEncoder, HashingTextEncoder, get_image_encoder, get_text_encoder,
)
from tests.plugins.milvus import png, scene


def test_minilm_loads_offline_and_ranks_by_meaning(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = get_text_encoder("minilm")
    q, dog, mug = enc.encode(["where is my puppy?", "my golden retriever", "a blue coffee mug"])
    assert enc.dim == 384 and q.shape == (384,) and abs(np.linalg.norm(q) - 1) < 1e-5
    assert q @ dog > q @ mug + 0.1
    assert enc.encode([]).shape == (0, 384)


def test_hashing_encoder_is_deterministic_and_normalised():
    enc = HashingTextEncoder()
    a, b = enc.encode(["Bobo the dog", "Bobo the dog"])
    assert np.allclose(a, b) and abs(np.linalg.norm(a) - 1) < 1e-5


def test_global_descriptor_same_object_beats_clutter():
    enc = GlobalDescriptorEncoder()
    (img1, box1), (img2, box2) = scene(3, 1), scene(3, 2)
    other, obox = scene(7, 3)
    v = enc.encode([img1.crop(box1), img2.crop(box2), other.crop(obox)])
    assert v.shape == (3, enc.dim) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2]
    assert np.allclose(enc.encode([png(img1)]), enc.encode([img1]), atol=1e-6)  # bytes == PIL


def test_inputs_of_any_form_become_rgb():
    image, _ = scene(None, 1)
    assert decode(np.asarray(image)).mode == "RGB"
    assert decode(png(image.convert("L"))).mode == "RGB"


def test_unknown_encoder_names_list_the_known_ones():
    with pytest.raises(ValueError, match="minilm"):
        get_text_encoder("nope")
    with pytest.raises(ValueError, match="global"):
        get_image_encoder("nope")
    assert get_image_encoder("global") is get_image_encoder("global")  # one per process
