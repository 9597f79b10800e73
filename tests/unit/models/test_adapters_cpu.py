"""Test 1 of the KV core: a chunk written to bytes, read back and injected gives the same
next-token logits as the model's own forward over evidence + question (<= 1e-5, fp32), and the
same first 20 greedy tokens as the model's own ``generate``.

The reference is transformers' unmodified forward/generate (which computes its own positions,
M-RoPE included), so the placed path is checked against an independent implementation.
"""

from __future__ import annotations

import pytest
import torch

from personalkv.kv.codec import decode_chunk, encode_chunk
from personalkv.kv.engine import GenerationOptions, answer, encode_evidence

# fp32 with tiny random weights: logits are O(1); reordering of float sums gives ~1e-7.
LOGIT_TOL = 1e-5

CASES = [
    ("qwen2_vl", "text"),
    ("qwen2_vl", "image"),
    ("qwen2_5_vl", "image"),
    ("llava_onevision", "text"),
    ("llava_onevision", "image"),
    ("causal_lm", "text"),
    ("gemma3", "text"),
]

# Slow tier (`make test-fast` skips it): the subject is the tiny models of every architecture, compared token for token.
pytestmark = pytest.mark.slow


def evidence_parts(adapter, modality, photo):
    if modality == "text":
        return ["Concept <bo> (dog): a small brown dog.\ncollar: black leather\nears: floppy\n"]
    return ["Photo detail of <bo>: ", adapter.encode_image(photo(3)), "\n"]


@pytest.mark.parametrize("kind,modality", CASES)
@pytest.mark.parametrize("question_photo", [False, True], ids=["text-question", "photo-question"])
def test_stored_chunk_matches_fresh_prefill(tiny, photo, kind, modality, question_photo):
    adapter = tiny(kind)
    if question_photo and not adapter.supports_images:
        pytest.skip("text-only model")
    parts = evidence_parts(adapter, modality, photo)
    chunk = encode_evidence(
        adapter, parts, user_id="alice", concept_id="bo", kind="profile_text", content=b"evidence"
    )
    restored = decode_chunk(encode_chunk(chunk), expected_model=adapter.fingerprint())
    question = "Is this my dog? What is written on my mug?"
    image = photo(11, (70, 120)) if question_photo else None
    result = answer(adapter, [restored], question, image, GenerationOptions(max_new_tokens=20))

    q_image = adapter.encode_image(image) if image is not None else None
    segments = [
        adapter.build_segment([adapter.system_prefix_text()]),
        adapter.build_segment(parts),
        adapter.build_segment(adapter.question_parts(question, q_image)),
    ]
    reference = adapter.reference_forward(segments, logits_to_keep=1)[-1]
    assert (result.first_logits - reference).abs().max().item() <= LOGIT_TOL

    inputs = adapter.reference_inputs(segments)
    with torch.inference_mode():
        generated = adapter.model.generate(**inputs, max_new_tokens=20, do_sample=False)
    reference_tokens = generated[0, inputs["input_ids"].shape[1] :].tolist()
    eos = set(adapter.eos_token_ids)
    reference_tokens = reference_tokens[: next((i for i, t in enumerate(reference_tokens) if t in eos), 20)]
    assert result.token_ids == reference_tokens


def test_image_chunk_extent_differs_from_token_count_under_mrope(tiny, photo):
    adapter = tiny("qwen2_vl")
    chunk = encode_evidence(
        adapter, ["Photo: ", adapter.encode_image(photo(5)), "\n"],
        user_id="alice", concept_id="bo", kind="image_patch", content=b"p",
    )
    assert chunk.meta.position_span < chunk.meta.token_count
    assert chunk.positions.shape[0] == 3


def test_text_model_refuses_images(tiny, photo):
    with pytest.raises(ValueError, match="text-only"):
        tiny("causal_lm").encode_image(photo(1))


def test_fingerprint_depends_on_weights():
    from personalkv.models.tiny import tiny_model

    assert tiny_model("causal_lm", seed=0).fingerprint() != tiny_model("causal_lm", seed=1).fingerprint()
    assert tiny_model("causal_lm", seed=0).fingerprint() == tiny_model("causal_lm", seed=0).fingerprint()


def test_sampling_is_seeded(tiny):
    adapter = tiny("causal_lm")
    options = GenerationOptions(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    first = answer(adapter, [], "Tell me something.", options=options).token_ids
    second = answer(adapter, [], "Tell me something.", options=options).token_ids
    assert first == second


def test_profile_and_patch_chunks_carry_owner_and_content_in_their_hash(tiny, photo):
    from personalkv.kv.engine import encode
    from personalkv.kv.evidence import evidence_chunk_id, patch_evidence, profile_evidence

    adapter = tiny("qwen2_vl")
    a = encode(adapter, profile_evidence("Concept <bo>: dog"), user_id="alice", concept_id="bo")
    b = encode(adapter, profile_evidence("Concept <bo>: dog"), user_id="bob", concept_id="bo")
    c = encode(adapter, profile_evidence("Concept <bo>: cat"), user_id="alice", concept_id="bo")
    assert len({a.chunk_id, b.chunk_id, c.chunk_id}) == 3
    assert torch.equal(a.keys[0], b.keys[0])  # same tensors, different owners, different ids
    evidence = patch_evidence(photo(4), "bo", source="patch:0")
    patch = encode(adapter, evidence, user_id="alice", concept_id="bo")
    assert patch.meta.kind == "image_patch" and patch.image_embeds is not None
    assert patch.meta.source == "patch:0"
    # The id is known before the model runs (the pipeline skips chunks it already stores).
    assert evidence_chunk_id(adapter, evidence, user_id="alice", concept_id="bo") == patch.chunk_id
