"""A conversation's kept KV: turn N answered from it equals the same token sequence run from
scratch (the placed evidence, then every turn prefilled at once), at turns 2 and 5, for every
tiny architecture and for SmolLM2's real weights; evidence added mid-conversation sits after the
history; a replay from the turn record rebuilds the same cache.

Tolerance: max |dlogit| <= 1e-4 in fp32. The kept path fed the answers one token per forward
(the decode loop) and the reference feeds the whole history in one forward, so the two differ by
float reordering only (2.5e-5 seen on SmolLM2 at turns 2 and 5); greedy tokens must be identical.
"""

from __future__ import annotations

import pytest
import torch

from personalkv.config import ModelSettings
from personalkv.kv.conversation import ConversationKV
from personalkv.kv.engine import GenerationOptions, answer, encode_evidence
from personalkv.kv.generation import decode, prefill
from personalkv.kv.placement import place_chunks
from personalkv.kv.recompute import recompute
from personalkv.models.base import Segment
from personalkv.models.tiny import KINDS
from tests.plugins.models import get_tiny

pytestmark = pytest.mark.slow

LOGIT_TOL = 1e-4
QUESTIONS = ["Is this my dog?", "What is his collar like?", "And where does he love to go?",
             "What colour is my mug?", "Which of them is older?"]
FACTS = ["Concept <rex> (dog): Rex, a brown dog with a black collar; he loves the park.\n",
         "Concept <bobo> (mug): Bobo, a blue mug with a red star.\n",
         "Concept <fern> (plant): a fern in a terracotta pot.\n"]


def _chunks(adapter, texts):
    return [encode_evidence(adapter, [t], user_id="alice", concept_id=f"c{i}", kind="profile_text",
                            content=t.encode()) for i, t in enumerate(texts)]


def _reference(adapter, chunks, history: list[int], question: str, options):
    """From scratch: place + recompute the first turn's evidence, prefill everything else in
    one forward (``history``: the earlier turns' tokens, as fed), then the question."""
    with torch.inference_mode():
        ctx = place_chunks(adapter, chunks)
        recompute(adapter, ctx, options.recompute_ratio, options.recompute_strategy)
        question_ids = adapter.build_segment(adapter.question_parts(question)).token_ids.tolist()
        logits = prefill(adapter, ctx, Segment(token_ids=torch.tensor(history + question_ids)))
        tokens = decode(adapter, ctx, logits, options)
    return logits, tokens, question_ids


def _check_turns(adapter, max_new_tokens=6):
    chunks = _chunks(adapter, FACTS[:2])
    options = GenerationOptions(max_new_tokens=max_new_tokens, recompute_ratio=0.15)
    conv, history = ConversationKV(), []
    separator = adapter.tokenize(adapter.next_turn_text)
    for n, question in enumerate(QUESTIONS, start=1):
        out = conv.turn(adapter, chunks if n == 1 else [], question, options=options)
        ref_logits, ref_tokens, question_ids = _reference(adapter, chunks, history, question, options)
        if n in (2, 5):
            assert (out.first_logits - ref_logits).abs().max().item() <= LOGIT_TOL
            assert out.token_ids == ref_tokens
        history += question_ids + out.token_ids + separator
    assert conv.turns == 5 and conv.kv_tokens == len(history) - len(separator) \
        - len(conv.pending) + adapter.system_prefix().num_tokens + sum(c.meta.token_count for c in chunks)


@pytest.mark.parametrize("kind", KINDS)
def test_turns_2_and_5_from_the_kept_kv_equal_a_prefill_from_scratch(kind):
    _check_turns(get_tiny(kind))


def test_turns_2_and_5_equal_from_scratch_with_smollm2():
    from personalkv.models import load_adapter

    _check_turns(load_adapter("smollm2", settings=ModelSettings()), max_new_tokens=12)


@pytest.mark.parametrize("kind", KINDS)
def test_the_first_turn_is_the_single_turn_answer(kind):
    adapter = get_tiny(kind)
    chunks = _chunks(adapter, FACTS)
    options = GenerationOptions(max_new_tokens=5, recompute_ratio=0.3)
    single = answer(adapter, chunks, QUESTIONS[0], options=options)
    first = ConversationKV().turn(adapter, chunks, QUESTIONS[0], options=options)
    assert torch.equal(single.first_logits, first.first_logits) and single.token_ids == first.token_ids


@pytest.mark.parametrize("kind", KINDS)
def test_new_evidence_is_placed_after_the_history_and_a_replay_rebuilds_the_same_cache(kind):
    adapter = get_tiny(kind)
    chunks = _chunks(adapter, FACTS)
    options = GenerationOptions(max_new_tokens=5, recompute_ratio=0.2)
    kept, record = ConversationKV(), []
    plan = [(chunks[:1], QUESTIONS[0]), (chunks[1:2], QUESTIONS[3]), (chunks[:2], QUESTIONS[4]),
            ([], QUESTIONS[2])]
    for evidence, question in plan:
        before = kept.kv_tokens
        out = kept.turn(adapter, evidence, question, options=options)
        record.append((evidence, question, out.token_ids))
        if evidence is plan[1][0]:  # the new chunk sits right after the history and separator
            placed = kept.ctx.placed[-1]
            separator = len(adapter.tokenize(adapter.next_turn_text)) + 0
            assert placed.chunk is chunks[1] and placed.kv_start >= before + separator
    assert kept.evidence == [chunks[0].chunk_id, chunks[1].chunk_id]  # never placed twice

    replayed = ConversationKV()
    for evidence, question, answer_ids in record:
        replayed.turn(adapter, evidence, question, options=options, answer_ids=answer_ids)
    assert (replayed.turns, replayed.kv_tokens, replayed.evidence, replayed.pending) == \
        (kept.turns, kept.kv_tokens, kept.evidence, kept.pending)
    next_kept = kept.turn(adapter, [], QUESTIONS[1], options=options)
    next_replayed = replayed.turn(adapter, [], QUESTIONS[1], options=options)
    assert (next_kept.first_logits - next_replayed.first_logits).abs().max().item() <= LOGIT_TOL
    assert next_kept.token_ids == next_replayed.token_ids


@pytest.mark.parametrize("kind", KINDS)
def test_a_follow_up_without_new_evidence_is_one_forward(kind, monkeypatch):
    """Issue 29: a follow-up that adds no evidence does no placement work: the previous
    answer's last token and the turn separator ride in the question's forward."""
    adapter = get_tiny(kind)
    options = GenerationOptions(max_new_tokens=4, recompute_ratio=0.15)
    conv = ConversationKV()
    conv.turn(adapter, _chunks(adapter, FACTS[:2]), QUESTIONS[0], options=options)
    forwards = []
    real = type(adapter).run_decoder

    def counted(self, embeds, positions, cache):
        forwards.append(embeds.shape[1])
        return real(self, embeds, positions, cache)

    monkeypatch.setattr(type(adapter), "run_decoder", counted)
    pending = len(conv.pending)  # the last answer token, when the answer hit max_new_tokens
    started = conv.begin_turn(adapter, [], QUESTIONS[1], options=options)
    assert len(forwards) == 1 and started.recomputed_tokens == 0
    question = adapter.build_segment(adapter.question_parts(QUESTIONS[1])).num_tokens
    separator = len(adapter.tokenize(adapter.next_turn_text))
    assert forwards[0] == pending + separator + question


@pytest.mark.parametrize("kind", KINDS)
def test_a_turn_prefilled_in_pieces_equals_one_forward(kind):
    """Chunked prefill (``begin_turn_steps``): the question fed 3 tokens at a time, first turn and
    follow-up, gives the one-forward logits within LOGIT_TOL (fp32: float reordering only)."""
    adapter = get_tiny(kind)
    options = GenerationOptions(max_new_tokens=4, recompute_ratio=0.15, recompute_strategy="salience")
    whole, pieces = ConversationKV(), ConversationKV()
    chunks = _chunks(adapter, FACTS[:2])
    for n, question in enumerate(QUESTIONS[:2]):
        evidence = chunks if n == 0 else []
        one = whole.begin_turn(adapter, evidence, question, options=options)
        steps, yields = pieces.begin_turn_steps(adapter, evidence, question, options=options, piece_tokens=3), 0
        while True:
            try:
                next(steps)
                yields += 1
            except StopIteration as done:
                split = done.value
                break
        assert yields >= 2  # it really came in pieces
        assert (one.logits - split.logits).abs().max().item() <= LOGIT_TOL
        tokens = [int(torch.argmax(one.logits))]
        whole.end_turn(adapter, one, tokens, options)
        pieces.end_turn(adapter, split, tokens, options)
