"""Proposals, NMS, saliency, colour windows, extractor registry, contact sheets."""

from __future__ import annotations

import numpy as np
import pytest

from personalkv.mining.features import ColourEmbedder, PatchEmbedder
from personalkv.mining.registry import (get_local_extractor, get_patch_embedder,
                                        get_subject_prior, register_patch_embedder)
from personalkv.mining.miner import MinedConcept, MinedPatch
from personalkv.mining.proposals import box_iou, nms, propose_boxes
from personalkv.mining.saliency import box_means
from personalkv.mining.sheets import render_sheet


def test_proposals_cover_the_photo_at_every_scale():
    boxes = propose_boxes((300, 400), fractions=(0.3, 0.6))
    assert boxes[:, 2].max() == pytest.approx(400) and boxes[:, 3].max() == pytest.approx(300)
    assert boxes[:, 0].min() == 0 and boxes[:, 1].min() == 0
    assert set(np.round(boxes[:, 2] - boxes[:, 0])) == {90, 180}


def test_nms_drops_overlaps_and_keeps_order():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], np.float32)
    assert nms(boxes, np.array([0.9, 0.8, 0.5]), k=3, iou=0.3) == [0, 2]
    assert box_iou(boxes[:1], boxes[:1])[0, 0] == pytest.approx(1.0)


def test_saliency_prefers_the_odd_object():
    img = np.full((120, 160, 3), 128, np.uint8)
    img[40:80, 100:140] = (250, 20, 20)
    prior = get_subject_prior("saliency").prior(img)
    obj, bg = box_means(prior, np.array([[100, 40, 140, 80], [0, 0, 40, 40]], np.float32))
    assert prior.shape == (120, 160) and obj > bg


def test_colour_windows_equal_crop_embeddings():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (100, 120, 3)).astype(np.uint8)
    emb = ColourEmbedder()
    boxes = np.array([[0, 0, 50, 50], [10, 20, 110, 90]], np.float32)
    fast = emb.embed_boxes(img, boxes)
    slow = emb.embed([img[0:50, 0:50], img[20:90, 10:110]])
    assert np.allclose(fast, slow, atol=1e-5)
    assert np.allclose(np.linalg.norm(fast, axis=1), 1.0)


def test_registry_names_known_backends_and_accepts_plugins():
    with pytest.raises(ValueError, match="sift"):
        get_local_extractor("nope")
    with pytest.raises(ValueError, match="'saliency'"):
        get_subject_prior("nope")
    with pytest.raises(ValueError, match="'vlm'"):  # known: the built-ins and the VLM tower
        get_patch_embedder("nope")

    class Const(PatchEmbedder):
        name = "const"

        def embed(self, crops):
            return np.ones((len(crops), 4), np.float32) / 2

    register_patch_embedder("const", Const)
    out = get_patch_embedder("const").embed_boxes(np.zeros((10, 10, 3), np.uint8), np.array([[0, 0, 5, 5]]))
    assert out.shape == (1, 4)


def test_sift_finds_keypoints_on_texture():
    rng = np.random.default_rng(1)
    img = (rng.random((64, 64, 3)) * 255).astype(np.uint8).repeat(3, 0).repeat(3, 1)
    feats = get_local_extractor("sift").extract(img)
    assert len(feats) > 20 and feats.desc.shape[1] == 128
    assert feats.xy[:, 0].max() <= img.shape[1] and feats.xy[:, 1].max() <= img.shape[0]


def test_contact_sheet_has_photos_and_crops():
    photos = [np.zeros((100, 200, 3), np.uint8), np.zeros((150, 100, 3), np.uint8)]
    mined = MinedConcept("x", [MinedPatch(1, "p", (10, 10, 60, 60), 0.9, {}),
                               MinedPatch(0, "q", (0, 0, 50, 50), 0.5, {})])
    sheet = render_sheet(photos, mined)
    assert sheet.width == 6 * 256 and sheet.height == 20 + 256 + 128
