"""DecodeBatch: requests of different lengths decoding together give, token for token, the
answers they give alone (the solo decode loop), for every tiny architecture and SmolLM2; rows
join and leave between steps; a kept row's KV goes back to its context exactly as the solo
loop would have left it.

Tolerance: greedy tokens identical (the property users see); logits within 1e-4 (fp32: a padded
row differs from its solo run by float reordering only; masked columns add exactly zero).
"""

from __future__ import annotations

import pytest
import torch

from personalkv.config import ModelSettings
from personalkv.engine.batch import DecodeBatch
from personalkv.kv.conversation import ConversationKV
from personalkv.kv.engine import GenerationOptions, encode_evidence
from personalkv.kv.generation import decode
from personalkv.models.tiny import KINDS
from tests.plugins.models import get_tiny

pytestmark = pytest.mark.slow

LOGIT_TOL = 1e-4
FACTS = ["Concept <rex> (dog): Rex, a brown dog with a black collar; he loves the park.\n",
         "Concept <bobo> (mug): Bobo, a blue mug with a red star.\n",
         "Concept <fern> (plant): a fern in a terracotta pot, watered on Sundays.\n"]
# (evidence indices, question, max_new_tokens): mixed lengths and budgets
REQUESTS = [((0,), "Is this my dog?", 9), ((0, 1, 2), "Which of my things is blue, and why?", 5),
            ((), "Hello there, how are you today?", 12), ((1, 2), "What is in the pot?", 7)]


def _chunks(adapter):
    return [encode_evidence(adapter, [t], user_id="alice", concept_id=f"c{i}", kind="profile_text",
                            content=t.encode()) for i, t in enumerate(FACTS)]


def _solo(adapter, chunks, question, options):
    conv = ConversationKV()
    started = conv.begin_turn(adapter, chunks, question, options=options)
    with torch.inference_mode():
        tokens = decode(adapter, conv.ctx, started.logits, options)
    return tokens, conv


def _batched(adapter, requests, join_at):
    """Run ``requests`` through one DecodeBatch; request i joins after ``join_at[i]`` steps."""
    batch, live, out, states, step = DecodeBatch(adapter), {}, {}, {}, 0
    pending = sorted(range(len(requests)), key=lambda i: join_at[i])
    with torch.inference_mode():
        while pending or live:
            while pending and join_at[pending[0]] <= step:
                i = pending.pop(0)
                chunks, question, options = requests[i]
                conv = ConversationKV()
                started = conv.begin_turn(adapter, chunks, question, options=options)
                token = int(torch.argmax(started.logits))
                out[i], states[i] = [token], conv
                if token in adapter.eos_token_ids:
                    out[i] = []
                elif options.max_new_tokens > 1:
                    live[i] = batch.join(conv.ctx, token)
            if not live:
                step += 1
                continue
            logits = batch.step()
            for row_index, (i, row) in enumerate(list(live.items())):
                token = int(torch.argmax(logits[row_index]))
                options = requests[i][2]
                if token in adapter.eos_token_ids:
                    batch.leave(row, keep=True)
                    del live[i]
                    continue
                out[i].append(token)
                if len(out[i]) == options.max_new_tokens:
                    batch.leave(row, keep=True)
                    del live[i]
                else:
                    row.next_token = token
            step += 1
    return out, states


def _check(adapter, join_at):
    chunks = _chunks(adapter)
    requests = [([chunks[j] for j in ev], q, GenerationOptions(max_new_tokens=n, recompute_ratio=0.15))
                for ev, q, n in REQUESTS]
    solo = [_solo(adapter, *r) for r in requests]
    batched, states = _batched(adapter, requests, join_at)
    for i, (tokens, conv) in enumerate(solo):
        assert batched[i] == tokens, i
        # the KV a kept row hands back is the solo loop's (same length, same next position)
        kept = states[i].ctx
        assert (kept.kv_length, kept.next_position) == (conv.ctx.kv_length, conv.ctx.next_position)
        for layer in (0, adapter.num_layers - 1):
            mine, theirs = adapter.cache_kv(kept.cache, layer), adapter.cache_kv(conv.ctx.cache, layer)
            assert torch.allclose(mine[0], theirs[0], atol=1e-4) and torch.allclose(mine[1], theirs[1], atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_batched_greedy_answers_equal_solo_answers(kind):
    _check(get_tiny(kind), join_at=[0, 0, 0, 0])


@pytest.mark.parametrize("kind", KINDS)
def test_rows_join_and_leave_between_steps(kind):
    _check(get_tiny(kind), join_at=[0, 2, 3, 5])


def test_batched_equals_solo_with_smollm2():
    from personalkv.models import load_adapter

    _check(load_adapter("smollm2", settings=ModelSettings()), join_at=[0, 1, 1, 4])


def test_a_batch_of_one_is_the_solo_loop_bit_for_bit():
    adapter = get_tiny(KINDS[0])
    chunks = _chunks(adapter)
    options = GenerationOptions(max_new_tokens=8)
    conv = ConversationKV()
    started = conv.begin_turn(adapter, chunks[:2], "Is this my dog?", options=options)
    reference = ConversationKV()
    ref_start = reference.begin_turn(adapter, chunks[:2], "Is this my dog?", options=options)
    with torch.inference_mode():
        batch = DecodeBatch(adapter)
        row = batch.join(conv.ctx, int(torch.argmax(started.logits)))
        from personalkv.kv.generation import prefill
        from personalkv.models.base import Segment

        token = int(torch.argmax(ref_start.logits))
        for _ in range(5):
            solo_logits = prefill(adapter, reference.ctx, Segment(token_ids=torch.tensor([token])))
            batch_logits = batch.step()[0]
            assert torch.equal(solo_logits, batch_logits)
            token = int(torch.argmax(solo_logits))
            row.next_token = token


def test_an_empty_batch_refuses_to_step():
    with pytest.raises(ValueError):
        DecodeBatch(get_tiny(KINDS[0])).step()
