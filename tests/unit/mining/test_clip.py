"""CLIP / SigLIP embedder and relevance scorer on tiny random models built offline.

Each checkpoint (a 2-layer, 32-wide CLIP or SigLIP with 32 px images and 8 px patches, the
locally trained BPE tokenizer of ``personalkv.models.tiny`` and the model's image processor) is
saved into a temporary directory and loaded back through :func:`load_clip`, so the real loading
code runs; nothing is downloaded.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from personalkv.mining.clip import ClipEmbedder, ClipRelevance, load_clip, make_clip_embedder, make_clip_relevance

TEXT_LEN = 16  # the text tower's max_position_embeddings; the tokenizer's own limit is "infinite"
SIDE = 32
SIGLIP_SCALE, SIGLIP_BIAS = math.log(10.0), -2.0


def _build(kind: str, path) -> None:
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, SiglipConfig,
                              SiglipImageProcessor, SiglipModel, SiglipProcessor)

    from personalkv.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=TEXT_LEN, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, bos_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=SIDE, patch_size=8)
    torch.manual_seed(0)
    if kind == "clip":
        model = CLIPModel(CLIPConfig(text_config=dict(text, projection_dim=16),
                                     vision_config=dict(vision, projection_dim=16), projection_dim=16))
        image_processor = CLIPImageProcessor(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE})
        processor = CLIPProcessor(image_processor=image_processor, tokenizer=tok)
    else:
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        with torch.no_grad():  # post_init zeroes them; make the calibration non-trivial
            model.logit_scale.fill_(SIGLIP_SCALE)
            model.logit_bias.fill_(SIGLIP_BIAS)
        processor = SiglipProcessor(image_processor=SiglipImageProcessor(size={"height": SIDE, "width": SIDE}),
                                    tokenizer=tok)
    model.save_pretrained(path)
    processor.save_pretrained(path)


@pytest.fixture(scope="module", params=["clip", "siglip"])
def ckpt(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    _build(request.param, path)
    return request.param, str(path)


def _crops(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (int(rng.integers(8, 60)), int(rng.integers(8, 60)), 3), dtype=np.uint8)
            for _ in range(n)]


def _reference_relevance(kind: str, path: str, crops, text: str) -> tuple[np.ndarray, np.ndarray]:
    """(cosine, relevance) computed here from get_image_features / get_text_features directly."""
    from PIL import Image

    clip = load_clip(path)
    model, proc = clip.model, clip.processor
    pixels = proc.image_processor(images=[Image.fromarray(c) for c in crops], return_tensors="pt")["pixel_values"]
    tok = proc.tokenizer([text], truncation=True, max_length=TEXT_LEN,
                         padding="max_length" if kind == "siglip" else True, return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels).pooler_output.double()
        txt = model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).pooler_output
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt.double() / txt.double().norm(dim=-1, keepdim=True)
    cos = (img @ txt[0]).numpy()
    if kind == "siglip":
        rel = 1.0 / (1.0 + np.exp(-(math.exp(SIGLIP_SCALE) * cos + SIGLIP_BIAS)))
    else:
        rel = (cos + 1.0) / 2.0
    return cos, rel


def test_loads_the_right_model_once(ckpt):
    kind, path = ckpt
    clip = load_clip(path)
    assert type(clip.model).__name__ == ("CLIPModel" if kind == "clip" else "SiglipModel")
    assert not clip.model.training
    assert next(clip.model.parameters()).dtype == torch.float32
    assert load_clip(path) is clip
    assert make_clip_embedder(path).model is make_clip_relevance(path).model is clip.model


def test_embed_shape_dtype_unit_norm(ckpt):
    _, path = ckpt
    emb = ClipEmbedder(path)
    assert emb.name == "clip"
    out = emb.embed(_crops(5))
    assert out.shape == (5, emb.dim) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    assert np.ptp(out, axis=0).max() > 1e-3  # different crops, different vectors
    assert emb.embed([]).shape == (0, emb.dim)


def test_embed_is_deterministic(ckpt):
    _, path = ckpt
    emb = ClipEmbedder(path)
    crops = _crops(4, seed=1)
    assert np.array_equal(emb.embed(crops), emb.embed(crops))


def test_batch_invariance(ckpt):
    # Batched and single forwards run the same maths but float32 kernels (matmul blocking,
    # reductions) may group the sums differently by batch shape: equal up to ~1e-6, not bits.
    _, path = ckpt
    crops = _crops(7, seed=2)
    whole = ClipEmbedder(path, batch=32).embed(crops)
    one_by_one = np.concatenate([ClipEmbedder(path).embed([c]) for c in crops])
    in_threes = ClipEmbedder(path, batch=3).embed(crops)
    np.testing.assert_allclose(one_by_one, whole, atol=1e-5)
    np.testing.assert_allclose(in_threes, whole, atol=1e-5)


def test_identical_crops_cosine_one_and_relevance_is_rescaled_cosine(ckpt):
    kind, path = ckpt
    crops = _crops(6, seed=3)
    emb = ClipEmbedder(path).embed([crops[0], crops[0].copy(), crops[1]])
    assert float(emb[0] @ emb[1]) == pytest.approx(1.0, abs=1e-6)
    assert float(emb[0] @ emb[2]) < 0.9999

    rel = ClipRelevance(path)
    text = "a red mug with a chipped handle on the kitchen table"
    got = rel(crops, text)
    cos, want = _reference_relevance(kind, path, crops, text)
    assert got.shape == (6,) and got.dtype == np.float32
    assert np.all((got >= 0) & (got <= 1))
    np.testing.assert_allclose(rel.cosine(crops, text), cos, atol=1e-5)
    np.testing.assert_allclose(got, want, atol=1e-5)
    order = np.argsort(cos)
    assert np.all(np.diff(got[order]) >= -1e-6)  # monotone in the cosine
    assert len(np.unique(np.round(got, 6))) > 1  # and not constant
    # identical crops score identically (up to float32 rounding: rows of one batch may be
    # computed by different SIMD lanes / matmul blocks, ~1 ulp apart)
    pair = rel([crops[0], crops[0].copy()], text)
    assert pair[0] == pytest.approx(float(pair[1]), abs=1e-6)
    # the rescaling maps [-1, 1] into [0, 1] increasingly
    ends = rel.rescale(np.array([-1.0, 0.0, 1.0]))
    assert 0.0 <= ends[0] < ends[1] < ends[2] <= 1.0
    if kind == "clip":
        np.testing.assert_allclose(ends, [0.0, 0.5, 1.0])


def test_zero_size_crop_is_a_black_image(ckpt):
    kind, path = ckpt
    emb = ClipEmbedder(path)
    black = np.zeros((SIDE, SIDE, 3), np.uint8)
    out = emb.embed([np.zeros((0, 5, 3), np.uint8), np.zeros((4, 0, 3), np.uint8), black])
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[0], out[2], atol=1e-5)
    np.testing.assert_allclose(out[1], out[2], atol=1e-5)
    rel = ClipRelevance(path)(
        [np.zeros((0, 0, 3), np.uint8), np.full((1, 1, 3), 200, np.uint8)], "a blue bike")
    assert rel.shape == (2,) and np.isfinite(rel).all() and np.all((rel >= 0) & (rel <= 1))


def test_overlong_text_is_truncated(ckpt):
    _, path = ckpt
    rel = ClipRelevance(path)
    words = "my grey cat sleeps on the green sofa near the window every afternoon".split()
    long_a = " ".join(words * 40)
    long_b = long_a + " and this tail is well past the truncation point"
    assert rel.text_inputs(long_a)["input_ids"].shape[1] == TEXT_LEN
    crops = _crops(3, seed=4)
    a, b = rel(crops, long_a), rel(crops, long_b)
    assert np.isfinite(a).all() and np.all((a >= 0) & (a <= 1))
    np.testing.assert_array_equal(a, b)  # only the first TEXT_LEN tokens count
    assert rel(crops, "").shape == (3,)


def test_embed_boxes_on_an_image(ckpt):
    _, path = ckpt
    emb = ClipEmbedder(path)
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    boxes = np.array([[0, 0, 32, 32], [10.4, 5.6, 70.2, 60.0], [40, 40, 40, 50]], np.float32)  # last is empty
    out = emb.embed_boxes(image, boxes)
    assert out.shape == (3, emb.dim) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    manual = emb.embed([image[0:32, 0:32], image[6:60, 10:70]])
    np.testing.assert_allclose(out[:2], manual, atol=1e-5)
    np.testing.assert_allclose(out[2], emb.embed([np.zeros((SIDE, SIDE, 3), np.uint8)])[0], atol=1e-5)


def test_settings_route_clip_names_into_the_miner(ckpt, synth_factory):
    """``PERSONALKV_MINING_EMBEDDER=clip:<path>`` and ``..._RELEVANCE=clip:<path>`` reach the
    library and the miner: window embeddings come from the checkpoint and every mined patch
    carries a relevance score in [0, 1]."""
    from personalkv.config import MiningSettings
    from personalkv.mining.clip import ClipEmbedder
    from personalkv.mining.miner import Miner, build_library

    _, path = ckpt
    data = synth_factory(n_concepts=2, photos=3, n_backgrounds=3, seed=5)
    settings = MiningSettings(embedder=f"clip:{path}", relevance=f"clip:{path}", top_k=3)
    photos = {cid: [p.image for p in ps] for cid, ps in data.concepts.items()}
    library = build_library(settings, photos, data.negatives)
    assert isinstance(library.embedder, ClipEmbedder)
    cid = next(iter(photos))
    mined = Miner(library, settings).mine(cid, photos[cid], "a small toy with a red mark")
    assert len(mined.patches) == 3
    assert all(0.0 <= p.scores["relevance"] <= 1.0 for p in mined.patches)
