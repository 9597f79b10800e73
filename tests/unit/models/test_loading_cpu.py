"""The real loading path (`load_adapter` on a local directory, as for downloaded weights):
save a tiny model with its tokenizer and image processor the way the hub lays them out, load it
back through transformers' Auto classes, and check it answers exactly like the original."""

from __future__ import annotations

import pytest

from personalkv.config import ModelSettings
from personalkv.kv.engine import GenerationOptions, answer, encode
from personalkv.kv.evidence import profile_evidence
from personalkv.models import ModelLoadError, load_adapter
from personalkv.models.tiny import tiny_model

# Slow tier (`make test-fast` skips it): the subject is model loading from checkpoints.
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("kind", ["qwen2_vl", "llava_onevision", "causal_lm"])
def test_load_adapter_from_local_directory(tmp_path, kind):
    original = tiny_model(kind, seed=3)
    original.model.save_pretrained(tmp_path)
    original.tokenizer.save_pretrained(tmp_path)
    if original.image_processor is not None:
        original.image_processor.save_pretrained(tmp_path)

    loaded = load_adapter(str(tmp_path), device="cpu", dtype="float32",
                          settings=ModelSettings(cache_dir=str(tmp_path / "cache")))
    assert type(loaded) is type(original)
    chunk = encode(original, profile_evidence("Concept <bo>: a small brown dog."), user_id="alice", concept_id="bo")
    options = GenerationOptions(max_new_tokens=5)
    expected = answer(original, [chunk], "Is this my dog?", options=options)
    got = answer(loaded, [chunk], "Is this my dog?", options=options)
    # Same weights, but loading may pick another attention kernel / memory layout: float
    # reordering only (~1e-8 seen), far inside the 1e-5 used throughout the KV tests.
    assert (expected.first_logits - got.first_logits).abs().max().item() <= 1e-5
    assert expected.token_ids == got.token_ids


def test_unknown_tiny_kind_and_architecture_are_refused(tmp_path):
    with pytest.raises(ValueError, match="known: qwen2_vl"):
        load_adapter("tiny:gpt5", settings=ModelSettings())
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ModelLoadError, match="unsupported architecture 'bert'") as raised:
        load_adapter(str(tmp_path), settings=ModelSettings())
    assert repr(str(tmp_path)) in str(raised.value)  # the message names the model


def test_a_model_that_cannot_load_names_itself_and_the_cause(tmp_path):
    # Offline (tests/conftest.py), so a hub id that is not cached fails at once, saying why.
    with pytest.raises(ModelLoadError) as raised:
        load_adapter("personalkv-test/no-such-model", settings=ModelSettings(cache_dir=str(tmp_path)))
    message = str(raised.value)
    assert message.startswith("cannot load model 'personalkv-test/no-such-model' (HF_HUB_OFFLINE=1")
    assert "not in the local model cache" in message  # checked before transformers tries files
    assert "\n" not in message


def test_revision_pins_the_hub_snapshot_that_loads(tmp_path):
    """A hub id in the HF cache with two snapshots: the default branch loads one, ``revision``
    the other (weights and their digest). In a subprocess: HF_HUB_CACHE is read on import."""
    import os
    import subprocess
    import sys

    from personalkv.models.checkpoint import weights_digest

    repo = tmp_path / "hub" / "models--personalkv-test--tiny"
    snapshots = {}
    for seed, sha in ((1, "a" * 40), (2, "b" * 40)):
        snapshots[sha] = folder = repo / "snapshots" / sha
        model = tiny_model("causal_lm", seed=seed)
        model.model.save_pretrained(folder)
        model.tokenizer.save_pretrained(folder)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    script = (
        "import sys\n"
        "from personalkv.config import ModelSettings\n"
        "from personalkv.models import load_adapter\n"
        "for revision in ('', 'b' * 40):\n"
        "    settings = ModelSettings(revision=revision, cache_dir=sys.argv[1])\n"
        "    print(load_adapter('personalkv-test/tiny', settings=settings)._weights_id)\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "cache")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    default, pinned = done.stdout.split()
    memo = tmp_path / "memo"
    assert default == weights_digest(str(snapshots["a" * 40]), memo) != ""
    assert pinned == weights_digest(str(snapshots["b" * 40]), memo) != default
