"""`personalkv eval ask` on a tiny synthetic dataset: ingest through the use cases, then Ask's
retrieval for every test photo, negative, name and pair (no ../shared/data needed)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from PIL import Image

from personalkv.cli import build_parser
from personalkv.config import MiningSettings, RetrievalSettings, Settings
from personalkv.evaluation.ask import build_queries, evaluate_ask, side_by_side
from personalkv.evaluation.cli import format_ask_table as format_table
from personalkv.evaluation.dataset import load_dataset
from tests.unit.evaluation.test_recognition_eval import _scene as scene


def _scene(rng, mark=None):
    return scene(rng, mark, size=(240, 320), blobs=30, spread=140)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Three concepts, each a distinct textured mark (96 px) on random clutter; 2 train and 1
    test photo each; 3 negatives of clutter alone."""
    root = tmp_path_factory.mktemp("ask-ds")
    rng = np.random.default_rng(3)
    for c in ("alpha", "beta", "gamma"):
        mark = cv2.resize(rng.integers(0, 256, (8, 8, 3)).astype(np.uint8), (96, 96),
                          interpolation=cv2.INTER_NEAREST)
        for split, n in (("train", 2), ("test", 1)):
            (root / "concepts" / c / split).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(_scene(rng, mark)).save(root / "concepts" / c / split / f"{c}{i}.jpg", quality=95)
        (root / "concepts" / c / "profile.json").write_text(json.dumps({"name": c.capitalize(), "category": "toy"}))
    (root / "negatives").mkdir()
    for i in range(3):
        Image.fromarray(_scene(rng)).save(root / "negatives" / f"n{i}.jpg", quality=95)
    return root


def test_queries_cover_every_photo_name_and_pair(dataset):
    ds = load_dataset(dataset)
    kinds = [q.kind for q in build_queries(ds)]
    assert kinds.count("positive") == 3 and kinds.count("negative") == 3 and kinds.count("named") == 3
    assert kinds.count("pair_photo") == 3 and kinds.count("pair_text") == 3  # cyclic pairs
    assert kinds.count("triple_photo") == 1  # 3 concepts: one triple
    pair = side_by_side(ds.concepts[0].test[0], ds.concepts[1].test[0], height=100)
    with Image.open(__import__("io").BytesIO(pair)) as im:
        assert im.height == 100 and im.width == 2 * round(320 * 100 / 240)


@pytest.mark.parametrize("encoders", [
    ("global", "colour"),  # weights-free: recognition rests on the recognizer's keypoints
    pytest.param(("efficientnet-lite0", "efficientnet-lite0"), marks=pytest.mark.slow),  # shipped
], ids=["weights-free", "shipped"])
def test_eval_ask_ingests_through_the_service_and_scores_ask(dataset, tiny, tmp_path, encoders):
    image_encoder, embedder = encoders
    settings = Settings(retrieval=RetrievalSettings(text_encoder="hashing", image_encoder=image_encoder),
                        mining=MiningSettings(embedder=embedder))
    lines = []
    r = evaluate_ask(load_dataset(dataset), settings, sheet=tmp_path / "misses.png",
                     log=lines.append, adapter=tiny("qwen2_vl"))
    assert [l.split(" (")[0] for l in lines[:3]] == ["ingested alpha", "ingested beta", "ingested gamma"]
    assert r["counts"] == {"positive": 3, "negative": 3, "named": 3, "pair_photo": 3, "pair_text": 3,
                           "triple_photo": 1}
    # Distinct 96 px marks with 2 train photos each: every test photo is recognised (the
    # recognizer finds the mark's keypoints) and a named question finds its concept by name.
    assert r["positive_top1_any"] == 1.0 and r["positive_top1"] >= 2 / 3
    assert r["named_top1"] == 1.0
    for key in ("negative_reject", "weighted", "two_concept_recall", "two_concept_both",
                "three_concept_recall_photo", "positive_extra"):
        assert 0.0 <= r[key] <= 1.0
    # the side-by-side photos (2:1, 3:1) are also looked at in tiles: more than one view a photo
    assert r["recognizer_views_per_photo"] > 1.0
    assert r["two_concept_recall_text"] == 1.0  # both names in the question: both returned
    assert 0 < r["seconds_per_query"]["p50"] <= r["seconds_per_query"]["p95"] < 120
    assert r["ingest_seconds_per_photo"] > 0
    assert len(r["rows"]) == 16 and all("returned" in row for row in r["rows"])
    assert (tmp_path / "misses.png").exists() == (r["misses_sheet"] is not None)
    assert "weighted" in format_table(r)


def test_eval_ask_is_a_personalkv_command(dataset, tmp_path):
    args = build_parser().parse_args(["eval", "ask", str(dataset), "--json", str(tmp_path / "a.json"),
                                      "--half", "1"])
    assert args.func.__name__ == "run_eval_ask" and args.half == 1
