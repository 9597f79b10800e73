"""The engine's KV arithmetic (``engine.memory``) against the bytes a decode batch's tensors
really hold, for several batch shapes on every tiny model. Tolerance 10 % (issue 29); the
layout is deterministic, so the estimate is in fact exact."""

from __future__ import annotations

import pytest
import torch

from personalkv.engine.batch import HEADROOM, DecodeBatch
from personalkv.engine.memory import admission_peak_bytes, kv_bytes_per_token, padded_batch_bytes
from personalkv.kv.conversation import ConversationKV
from personalkv.kv.engine import GenerationOptions
from personalkv.models.tiny import KINDS
from tests.plugins.models import get_tiny

QUESTIONS = ["Hi?", "What colour is my mug, and where did I leave it last week?",
             "Tell me everything about my dog and his favourite park in the city, please."]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [1, 2, 3])
def test_the_estimate_is_the_bytes_the_batch_holds(kind, rows):
    adapter = get_tiny(kind)
    batch, lengths = DecodeBatch(adapter), []
    for question in QUESTIONS[:rows]:
        conv = ConversationKV()
        started = conv.begin_turn(adapter, [], question, options=GenerationOptions(max_new_tokens=4))
        lengths.append(conv.kv_tokens)
        batch.join(conv.ctx, int(torch.argmax(started.logits)))
    batch.step()  # lays the rows out
    estimate = padded_batch_bytes(lengths, kv_bytes_per_token(adapter))
    assert abs(estimate - batch.nbytes()) <= 0.10 * batch.nbytes(), (estimate, batch.nbytes())


def test_the_peak_counts_both_layouts_and_the_joining_row():
    per_token = 1000
    assert padded_batch_bytes([], per_token) == 0
    assert padded_batch_bytes([10, 30], per_token) == 2 * (30 + HEADROOM) * per_token
    assert admission_peak_bytes([10, 30], 50, per_token) == (
        2 * (30 + HEADROOM) + 3 * (50 + HEADROOM) + 50) * per_token
