"""`personalkv eval recognition` and `personalkv mine` on a tiny synthetic dataset folder."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from PIL import Image

from personalkv.cli import main
from personalkv.config import get_settings
from personalkv.evaluation.dataset import load_dataset


@pytest.fixture(params=["colour", pytest.param("efficientnet-lite0", marks=pytest.mark.slow)])
def embedder(request, monkeypatch):
    """The commands with the miner's weights-free patch embedder in the fast tier, and with the
    shipped default (EfficientNet) in the full suite."""
    monkeypatch.setenv("PERSONALKV_MINING_EMBEDDER", request.param)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def _scene(rng, mark=None, size=(200, 240), blobs=25, spread=120):
    """Random clutter (``blobs`` circles) of ``size`` (h, w), ``mark`` pasted within ``spread`` px."""
    img = np.full((*size, 3), rng.integers(80, 180, 3), np.uint8)
    for _ in range(blobs):
        x, y = (int(v) for v in rng.integers(0, size[1] - 20, 2))
        cv2.circle(img, (x, y), int(rng.integers(4, 20)), tuple(int(c) for c in rng.integers(0, 256, 3)), -1)
    if mark is not None:
        x, y = (int(v) for v in rng.integers(10, spread, 2))
        img[y:y + mark.shape[0], x:x + mark.shape[1]] = mark
    return img


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    rng = np.random.default_rng(7)
    for c in ("alpha", "beta", "gamma"):
        mark = cv2.resize(rng.integers(0, 256, (8, 8, 3)).astype(np.uint8), (64, 64), interpolation=cv2.INTER_NEAREST)
        folder = root / "concepts" / c
        for split, n in (("train", 2), ("test", 1)):
            (folder / split).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(_scene(rng, mark)).save(folder / split / f"{i}.jpg", quality=95)
        (folder / "profile.json").write_text(json.dumps({"name": c, "category": "toy", "info": ""}))
    (root / "negatives").mkdir()
    for i in range(4):
        Image.fromarray(_scene(rng)).save(root / "negatives" / f"n{i}.jpg", quality=95)
    (root / "questions.jsonl").write_text(json.dumps({"concept": "alpha", "image": None, "split": "test",
                                                      "kind": "text_mc", "question": "?", "answer": "A"}) + "\n")
    return root


def test_dataset_reader(dataset):
    ds = load_dataset(dataset)
    assert [c.concept_id for c in ds.concepts] == ["alpha", "beta", "gamma"]
    assert len(ds.concepts[0].train) == 2 and len(ds.concepts[0].test) == 1
    assert len(ds.negatives) == 4 and ds.questions[0]["kind"] == "text_mc"
    with pytest.raises(FileNotFoundError):
        load_dataset(dataset / "negatives")


def test_eval_recognition_command_writes_figures(dataset, embedder, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["eval", "recognition", str(dataset), "--json", str(out), "--sheets", str(tmp_path / "sheets")]) == 0
    figures = json.loads(out.read_text())
    for key in ("positive_top1", "negative_reject", "weighted", "seconds_per_photo"):
        assert 0.0 <= figures[key] <= (1.0 if key != "seconds_per_photo" else 60.0)
    assert figures["positive_top1_any"] >= 2 / 3
    assert "weighted" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "sheets").iterdir()) == ["alpha.png", "beta.png", "gamma.png"]


def test_mine_command_writes_profiles_patches_and_sheets(dataset, embedder, tmp_path):
    out = tmp_path / "mined.json"
    assert main(["mine", str(dataset), "--concepts", "alpha", "--sheet", str(tmp_path / "s"), "--out", str(out)]) == 0
    mined = json.loads(out.read_text())
    assert list(mined) == ["alpha"]
    assert mined["alpha"]["profile"]["source"] == "user_facts"
    assert mined["alpha"]["patches"] and (tmp_path / "s" / "alpha.png").exists()
