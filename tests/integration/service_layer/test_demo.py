"""`make demo` runs offline end to end and prints answers, evidence and timings: with the tiny
random-weight model (the VLM code path) and, with no model configured, with SmolLM2's real
weights, whose answers must carry facts that only the placed profile chunks hold."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

MUG = "What is on the side of my mug?"
DOG = "Is this my dog? Where does he love to go?   [with a photo]"
FERN = "How often should I water this plant?   [with a photo]"
FRANCE = "What is the capital of France?"


def _qwen_fetched() -> bool:
    from personalkv.config import Settings
    from personalkv.models.checkpoint import SPLIT_GGUF_MODELS, split_gguf_path

    return split_gguf_path(SPLIT_GGUF_MODELS["qwen2.5-0.5b"], Settings().model.cache_path()).is_file()


def _run_demo(tmp_path, **env_update) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONALKV_")}
    env.update(HF_HUB_OFFLINE="1", PERSONALKV_SERVICE_DATA_DIR=str(tmp_path / "unused"), **env_update)
    proc = subprocess.run(
        [sys.executable, "-m", "personalkv.cli", "demo", "--data-dir", str(tmp_path / "demo")],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:] + out[-3000:]
    assert "ingested 3 concepts" in out
    for concept in ("bobo", "rex", "fern"):
        assert any(line.split()[:2] == [concept, "ready"] for line in out.splitlines()), out
    assert "demo finished" in out
    return out


def test_demo_given_a_model_it_cannot_load_fails_naming_it(tmp_path):
    """`make demo` (python -m personalkv.demo) with an unloadable model: exit 1, one line naming
    it, no answers from any other model."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONALKV_")}
    env.update(HF_HUB_OFFLINE="1", PERSONALKV_MODEL_NAME=str(tmp_path / "no-such-model"))
    proc = subprocess.run([sys.executable, "-m", "personalkv.demo"], env=env, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"personalkv demo: error: cannot load model '{tmp_path / 'no-such-model'}'"), proc.stderr
    assert "Traceback" not in proc.stderr and "A: " not in proc.stdout


def _answers(out: str) -> tuple[dict[str, str], list[str]]:
    blocks = out.split("\nQ: ")[1:]
    assert len(blocks) == 5
    return {b.splitlines()[0]: b for b in blocks}, blocks


def _answer_text(block: str) -> str:
    return next(line for line in block.splitlines() if line.startswith("A: ")).lower()


def test_demo_runs_offline_and_reports_evidence(tmp_path):
    out = _run_demo(tmp_path, PERSONALKV_MODEL_NAME="tiny:qwen2_vl")
    assert "answers are NOT meaningful" in out  # the tiny-model banner
    by_question, blocks = _answers(out)
    mug = by_question[MUG]
    assert "concepts: bobo" in mug and "personal evidence used: yes" in mug
    assert "concepts: rex" in by_question[DOG]
    assert "concepts: fern" in by_question[FERN]
    france = by_question[FRANCE]
    assert "none of yours" in france and "personal evidence used: no" in france
    placed = re.search(r"chunks placed: (\d+) \(cache hits (\d+),", blocks[-1])
    assert placed and placed.group(1) == placed.group(2) != "0"  # repeated: all from the LRU
    for stage in ("retrieve=", "load=", "place=", "prefill=", "decode="):
        assert stage in mug


def test_demo_without_a_vlm_answers_from_real_weights_and_placed_profiles(tmp_path):
    """SmolLM2 (text only; the default when qwen2.5-0.5b is not fetched). Greedy decoding on CPU in fp32 is
    deterministic, and each asked fact is written only in its own concept's profile, so the
    words below can only come from the placed chunk (the 'none' questions get no chunk)."""
    out = _run_demo(tmp_path, PERSONALKV_MODEL_NAME="smollm2")
    assert "SmolLM2-135M-Instruct, real weights, TEXT ONLY" in out
    assert "a question's photo only picks your concepts by retrieval" in out
    assert "answers are NOT meaningful" not in out
    by_question, _ = _answers(out)
    assert "concepts: bobo" in by_question[MUG] and "star" in _answer_text(by_question[MUG])
    assert "concepts: rex" in by_question[DOG] and "park" in _answer_text(by_question[DOG])
    assert "concepts: fern" in by_question[FERN] and "sunday" in _answer_text(by_question[FERN])
    assert "personal evidence used: no" in by_question[FRANCE]
    # The conversation: "he" in the follow-up is Rex, whose profile only the first turn placed.
    follow = out.split("turn 2: And where does he love to go?")[1]
    assert "park" in follow.splitlines()[1].lower()
    # it rests on the conversation's evidence (listed), none placed anew
    assert "concepts: rex" in follow and "chunks placed: 0" in follow
    # Text-only: one profile chunk per concept, no image-patch chunks.
    assert all(" 1 KV chunks" in line for line in out.splitlines() if line.split()[1:2] == ["ready"])


def test_demo_shows_the_answer_without_and_with_the_users_evidence(tmp_path):
    """The demo asks one question from an account with nothing stored and from the demo user:
    the user's answer carries the fact only the mug's profile holds, the guest's cannot (no
    chunk is placed for it)."""
    out = _run_demo(tmp_path, PERSONALKV_MODEL_NAME="smollm2")
    section = out.split("Does the evidence matter?")[1]
    without = next(line for line in section.splitlines() if "without your evidence:" in line)
    with_evidence = next(line for line in section.splitlines() if "with your evidence:" in line)
    assert "star" in with_evidence.lower() and "star" not in without.lower()


@pytest.mark.skipif(not _qwen_fetched(), reason="qwen2.5-0.5b is not fetched (make models)")
def test_demo_defaults_to_qwen_when_fetched_and_its_answers_use_the_evidence(tmp_path):
    out = _run_demo(tmp_path)
    assert "Qwen2.5-Coder-0.5B-Instruct, real weights, TEXT ONLY" in out
    by_question, _ = _answers(out)
    assert "concepts: bobo" in by_question[MUG] and "star" in _answer_text(by_question[MUG])
    assert "personal evidence used: no" in by_question[FRANCE]
