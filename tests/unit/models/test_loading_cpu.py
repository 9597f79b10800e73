"""The real loading path (`load_adapter` on a local directory, as for downloaded weights):
save a tiny model with its tokenizer and image processor the way the hub lays them out, load it
back through transformers' Auto classes, and check it answers exactly like the original."""

from __future__ import annotations

import pytest

from personalkv.config import ModelSettings
from personalkv.kv.engine import GenerationOptions, answer, encode
from personalkv.kv.evidence import profile_evidence
from personalkv.models import load_adapter
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
    with pytest.raises(ValueError, match="unsupported architecture 'bert'"):
        load_adapter(str(tmp_path), settings=ModelSettings())
