"""`make demo` runs offline end to end (tiny model) and prints answers, evidence and timings."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_demo_runs_offline_and_reports_evidence(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONALKV_")}
    env.update(PERSONALKV_MODEL_NAME="tiny:qwen2_vl", HF_HUB_OFFLINE="1",
               PERSONALKV_SERVICE_DATA_DIR=str(tmp_path / "unused"))
    proc = subprocess.run(
        [sys.executable, "-m", "personalkv.cli", "demo", "--data-dir", str(tmp_path / "demo")],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:] + out[-3000:]
    assert "answers are NOT meaningful" in out  # the tiny-model banner
    assert "ingested 3 concepts" in out
    for concept in ("bobo", "rex", "fern"):
        assert any(line.split()[:2] == [concept, "ready"] for line in out.splitlines()), out
    blocks = out.split("\nQ: ")[1:]
    assert len(blocks) == 5
    by_question = {b.splitlines()[0]: b for b in blocks}
    mug = by_question["What colour is my mug Bobo?"]
    assert "concepts: bobo" in mug and "personal evidence used: yes" in mug
    assert "concepts: rex" in by_question["Is this my dog? What is he wearing?   [with a photo]"]
    assert "concepts: fern" in by_question["When should I water it?   [with a photo]"]
    france = by_question["What is the capital of France?"]
    assert "none of yours" in france and "personal evidence used: no" in france
    placed = re.search(r"chunks placed: (\d+) \(cache hits (\d+),", blocks[-1])
    assert placed and placed.group(1) == placed.group(2) != "0"  # repeated: all from the LRU
    for stage in ("retrieve=", "load=", "place=", "prefill=", "decode="):
        assert stage in mug
    assert "demo finished" in out
