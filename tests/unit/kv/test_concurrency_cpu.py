"""Test 3 of the KV core: two different questions over different chunks, run concurrently in
two threads on one shared model, give exactly what each gives alone (bit-identical logits and
tokens). Qwen2-VL with a photo in each question exercises M-RoPE, where transformers would keep
``rope_deltas`` on the shared model if we went through its top-level forward."""

from __future__ import annotations

import threading

import torch

from personalkv.kv.engine import GenerationOptions, answer, encode_evidence
from personalkv.models.tiny import tiny_model


def test_concurrent_requests_do_not_interfere(photo):
    # A model of its own: other tests run transformers' forward (which sets rope_deltas) on the
    # session's shared tiny models, and we check below that our path never does.
    adapter = tiny_model("qwen2_vl", seed=0)

    def chunk(parts, concept):
        return encode_evidence(adapter, parts, user_id="alice", concept_id=concept, kind="profile_text", content=concept.encode())

    requests = [
        (
            [chunk(["Concept <bo>: brown dog.\n"], "bo"), chunk(["Detail: ", adapter.encode_image(photo(1)), "\n"], "bo2")],
            "Is this my dog?",
            photo(20, (64, 96)),
        ),
        (
            [chunk(["Detail: ", adapter.encode_image(photo(2, (120, 60))), "\n"], "mug"), chunk(["Concept <mug>: white mug.\n"], "mug2"), chunk(["Concept <cat>: grey.\n"], "cat")],
            "What is written on my mug, and where is it?",
            photo(21, (100, 50)),
        ),
    ]
    options = GenerationOptions(max_new_tokens=12, recompute_ratio=0.2)
    alone = [answer(adapter, c, q, img, options) for c, q, img in requests]
    assert alone[0].token_ids != alone[1].token_ids or not torch.equal(alone[0].first_logits, alone[1].first_logits)

    results: dict[tuple[int, int], object] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def worker(index: int) -> None:
        try:
            barrier.wait()
            for round_ in range(4):
                chunks, question, image = requests[index]
                results[(index, round_)] = answer(adapter, chunks, question, image, options)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(results) == 8
    for (index, _), result in results.items():
        assert result.token_ids == alone[index].token_ids
        assert torch.equal(result.first_logits, alone[index].first_logits)
    # No per-request state was left on the shared model.
    assert adapter.model.model.rope_deltas is None
