"""Selective recompute beyond test_placement_cpu: the question-aware ``query`` strategy and the
recompute that runs fused with the question's prefill.

Exactness: the fused forward must give what the recompute alone followed by the prefill gives
(the same keys, values and logits up to float reordering, 1e-5 in fp32), keep every token at its
position and leave no gap in the cache. ``query`` must spend nothing on the first chunk behind the
system prefix (its KV is already the full prefill's), always take every later chunk's first tokens
and, at r=1, equal a full prefill.
"""

from __future__ import annotations

import pytest
import torch

from personalkv.kv.engine import GenerationOptions, answer
from personalkv.kv.generation import prefill
from personalkv.kv.placement import place_chunks
from personalkv.kv.recompute import (
    SALIENCE_SINK_TOKENS,
    SINK_TOKENS,
    _select_salience,
    chunk_salience,
    salience_of,
    _chunk_inputs,
    _question_attention,
    _recompute_selected,
    _select_query,
    recompute,
)
from tests.unit.kv.test_placement_cpu import LOGIT_TOL, QUESTION, block_reference, evidence, stored_chunks

pytestmark = pytest.mark.slow


def question_segment(adapter, question: str = QUESTION):
    return adapter.build_segment(adapter.question_parts(question))


def cache_state(adapter, ctx):
    return [tuple(t.clone() for t in adapter.cache_kv(ctx.cache, i)) for i in range(adapter.num_layers)]


def starts_and_lengths(chunks):
    offset, out = 0, []
    for c in chunks:
        out.append((offset, c.meta.token_count))
        offset += c.meta.token_count
    return out


@pytest.mark.parametrize("kind", ["qwen2_vl", "llava_onevision", "causal_lm", "gemma3"])
@pytest.mark.parametrize("strategy", ["deviation", "first", "query", "salience"])
def test_fused_recompute_equals_recompute_then_prefill(tiny, photo, kind, strategy):
    adapter = tiny(kind)
    chunks = stored_chunks(adapter, evidence(adapter, photo))
    question = question_segment(adapter)
    ratio = 0.3
    with torch.inference_mode():
        fused = place_chunks(adapter, chunks)
        count = recompute(adapter, fused, ratio, strategy, question=question)
        assert len(fused.pending_recompute) == 1 and fused.kv_length == fused.prefix_tokens + sum(
            c.meta.token_count for c in chunks)  # nothing ran yet
        selected = fused.pending_recompute[0].selected.cpu()
        fused_logits = prefill(adapter, fused, question)

        alone = place_chunks(adapter, chunks)
        embeds, positions = _chunk_inputs(adapter, alone)
        _recompute_selected(adapter, alone, embeds, positions, selected)
        alone_logits = prefill(adapter, alone, question)
    assert count == selected.numel() > 0 and not fused.pending_recompute
    assert (fused_logits - alone_logits).abs().max().item() <= LOGIT_TOL
    assert fused.next_position == alone.next_position and fused.kv_length == alone.kv_length
    for (k1, v1), (k2, v2) in zip(cache_state(adapter, fused), cache_state(adapter, alone), strict=True):
        assert (k1 - k2).abs().max().item() <= LOGIT_TOL and (v1 - v2).abs().max().item() <= LOGIT_TOL


@pytest.mark.parametrize("kind", ["qwen2_vl", "causal_lm", "gemma3"])
def test_query_recomputes_nothing_for_one_chunk(tiny, photo, kind):
    """One chunk behind the system prefix is already exact: no budget is spent on it."""
    adapter = tiny(kind)
    chunks = stored_chunks(adapter, evidence(adapter, photo))[:1]
    reuse = answer(adapter, chunks, QUESTION, options=GenerationOptions(max_new_tokens=1))
    query = answer(adapter, chunks, QUESTION, options=GenerationOptions(
        max_new_tokens=1, recompute_ratio=0.5, recompute_strategy="query"))
    assert query.recomputed_tokens == 0
    assert torch.equal(query.first_logits, reuse.first_logits)


@pytest.mark.parametrize("kind", ["qwen2_vl", "causal_lm"])
def test_query_takes_every_later_chunks_first_tokens_and_none_of_the_first_chunk(tiny, photo, kind):
    adapter = tiny(kind)
    chunks = stored_chunks(adapter, evidence(adapter, photo))
    total = sum(c.meta.token_count for c in chunks)
    count = -(-total // 5)
    with torch.inference_mode():
        ctx = place_chunks(adapter, chunks)
        before = cache_state(adapter, ctx)
        embeds, positions = _chunk_inputs(adapter, ctx)
        selected = set(_select_query(adapter, ctx, question_segment(adapter), embeds, positions, count).tolist())
        after = cache_state(adapter, ctx)
    spans = starts_and_lengths(chunks)
    assert len(selected) == count
    first_start, first_len = spans[0]
    assert not selected & set(range(first_start, first_start + first_len))
    for start, length in spans[1:]:
        assert set(range(start, start + min(SINK_TOKENS, length))) <= selected
    # ... and the rest follows the question's attention, not the chunk starts.
    sinks = {i for start, length in spans[1:] for i in range(start, start + min(SINK_TOKENS, length))}
    assert selected - sinks
    # The probe left the cache as it was (its KV dropped again).
    assert len(before) == len(after)
    for (k1, v1), (k2, v2) in zip(before, after, strict=True):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)


def test_query_ranks_by_the_questions_attention(tiny, photo):
    """The probe's scores are attention probabilities: non-negative, and over the prefix and the
    placed tokens together at most one per probed layer (the rest goes to the question itself)."""
    from personalkv.kv import recompute as module

    adapter = tiny("causal_lm")
    chunks = stored_chunks(adapter, evidence(adapter, photo))
    with torch.inference_mode():
        ctx = place_chunks(adapter, chunks)
        scores = _question_attention(adapter, ctx, question_segment(adapter))
    layers = module.probe_layers(adapter)
    assert scores.shape == (sum(c.meta.token_count for c in chunks),)
    assert scores.min().item() >= 0 and 0 < scores.sum().item() <= layers + 1e-5


@pytest.mark.parametrize("kind", ["qwen2_vl", "llava_onevision", "causal_lm", "gemma3"])
def test_query_at_full_ratio_equals_full_prefill(tiny, photo, kind):
    adapter = tiny(kind)
    parts_list = evidence(adapter, photo)
    chunks = stored_chunks(adapter, parts_list)
    _, segments = block_reference(adapter, parts_list, QUESTION)
    full = adapter.reference_forward(segments, logits_to_keep=1)[-1]
    result = answer(adapter, chunks, QUESTION, options=GenerationOptions(
        max_new_tokens=1, recompute_ratio=1.0, recompute_strategy="query"))
    assert result.recomputed_tokens == sum(c.meta.token_count for c in chunks[1:])
    assert (result.first_logits - full).abs().max().item() <= LOGIT_TOL


def test_query_recomputes_evidence_appended_behind_a_history(tiny, photo):
    """In a follow-up turn even the first new chunk sits behind the history, not the system
    prefix: its placement is not exact, so the budget is spent on it."""
    from personalkv.kv.conversation import ConversationKV

    adapter = tiny("causal_lm")
    chunks = stored_chunks(adapter, evidence(adapter, photo))
    options = GenerationOptions(max_new_tokens=3, recompute_ratio=0.25, recompute_strategy="query")
    conversation = ConversationKV()
    assert conversation.turn(adapter, chunks[:1], QUESTION, options=options).recomputed_tokens == 0
    second = conversation.turn(adapter, chunks[1:2], "And the mug?", options=options)
    assert second.recomputed_tokens == -(-chunks[1].meta.token_count // 4)
    assert conversation.kv_tokens == conversation.ctx.kv_length  # no gap, nothing pending
    assert not conversation.ctx.pending_recompute


def test_query_needs_the_question(tiny, photo):
    adapter = tiny("causal_lm")
    chunks = stored_chunks(adapter, evidence(adapter, photo))
    with torch.inference_mode():
        ctx = place_chunks(adapter, chunks)
        with pytest.raises(ValueError, match="needs the question"):
            recompute(adapter, ctx, 0.2, "query")


def _mean_kl_to_full_prefill(adapter, parts_list, questions, ratio, strategies):
    from personalkv.evaluation.qa import kl_divergence

    chunks = stored_chunks(adapter, parts_list)
    kl = {s: 0.0 for s in strategies}
    for question in questions:
        _, segments = block_reference(adapter, parts_list, question)
        full = adapter.reference_forward(segments, logits_to_keep=1)[-1]
        for strategy in strategies:
            placed = answer(adapter, chunks, question, options=GenerationOptions(
                max_new_tokens=1, recompute_ratio=ratio, recompute_strategy=strategy))
            kl[strategy] += kl_divergence(full, placed.first_logits) / len(questions)
    return kl


TINY_QUESTIONS = [QUESTION, "What does the mug say?", "What colour is the cat?", "Does the dog wear a collar?"]


@pytest.mark.parametrize("kind", ["qwen2_vl", "llava_onevision", "causal_lm"])
def test_query_on_tiny_models_is_at_least_as_close_to_the_full_prefill_as_deviation(tiny, photo, kind):
    """Mean KL(full prefill || placed) over 4 questions at r = 0.25. Measured (query / deviation
    x 1e-4): causal_lm 2.35 / 2.47, qwen2_vl 4.82 / 4.76, llava_onevision 7.21 / 7.19.
    Random weights give the question's attention little meaning, so the margin is thin: query
    below deviation on causal_lm, within 5 % of it on the VLMs, and well below pure reuse."""
    adapter = tiny(kind)
    parts_list = evidence(adapter, photo)
    kl = _mean_kl_to_full_prefill(adapter, parts_list, TINY_QUESTIONS, 0.25, ["deviation", "query"])
    reuse = _mean_kl_to_full_prefill(adapter, parts_list, TINY_QUESTIONS, 0.0, ["query"])["query"]
    assert kl["query"] < 0.8 * reuse
    if kind == "causal_lm":
        assert kl["query"] < kl["deviation"], kl
    else:
        assert kl["query"] < 1.05 * kl["deviation"], kl


#: Real-weight checks: three profiles and four questions each answered by one of them.
SMOLLM2_TEXTS = [
    ["Bo is my dog, a shiba inu with an orange and white double coat, black eyes and a curled tail. "
     "He wears a red collar.\n"],
    ["Mam is my cat, a grey tabby with green eyes who sleeps on the blue sofa and hates water.\n"],
    ["My mug is white with blue letters that say 'ok'; I bought it in Lisbon and drink green tea from it.\n"],
]
SMOLLM2_QUESTIONS = [f"{q}\nAnswer with the letter." for q in (
    "What colour are Mam's eyes? A. Green B. Brown", "What breed is Bo? A. Corgi B. Shiba inu",
    "What do I drink from my mug? A. Coffee B. Green tea", "Is Bo's tail curled? A. Yes B. No")]


def test_query_beats_deviation_on_smollm2_at_3_chunks():
    """KL(full prefill || placed) of the next-token distribution, mean over 4 questions, 3 chunks
    at r = 0.15: measured 0.052 (query) vs 0.107 (deviation) and 0.110 (first); asserted with
    room for float and library drift: query below 0.6x deviation."""
    from personalkv.config import ModelSettings
    from personalkv.models import load_adapter

    adapter = load_adapter("smollm2", settings=ModelSettings())
    texts, questions = SMOLLM2_TEXTS, SMOLLM2_QUESTIONS
    kl = _mean_kl_to_full_prefill(adapter, texts, questions, 0.15, ["deviation", "query"])
    assert kl["query"] < 0.6 * kl["deviation"], kl


# --- salience: the probe measured at caching time ------------------------------------------------
@pytest.mark.parametrize("kind", ["qwen2_vl", "causal_lm", "gemma3"])
def test_salience_is_stored_when_encoded_and_equals_a_probe_over_the_chunk_alone(tiny, photo, kind):
    adapter = tiny(kind)
    chunks = stored_chunks(adapter, evidence(adapter, photo))  # encoded, stored and decoded again
    for chunk in chunks:
        assert chunk.salience is not None and chunk.salience.shape == (chunk.meta.token_count,)
        assert chunk.salience.min().item() >= 0
        assert torch.allclose(chunk.salience, chunk_salience(adapter, chunk), atol=1e-6)


def test_a_chunk_stored_without_salience_gets_it_on_first_use(tiny, photo):
    adapter = tiny("causal_lm")
    chunk = stored_chunks(adapter, evidence(adapter, photo))[1]
    stored = chunk.salience
    chunk.salience = None
    assert torch.allclose(salience_of(adapter, chunk), stored, atol=1e-6)
    assert chunk.salience is not None  # kept on the chunk (the decoded-chunk cache holds it)


@pytest.mark.parametrize("kind", ["qwen2_vl", "causal_lm"])
def test_salience_takes_later_chunks_sinks_then_the_most_salient_stale_tokens_without_a_probe(
        tiny, photo, kind, monkeypatch):
    from personalkv.kv import recompute as module

    adapter = tiny(kind)
    chunks = stored_chunks(adapter, evidence(adapter, photo))
    total = sum(c.meta.token_count for c in chunks)
    count = -(-total // 3)

    def no_probe(*_args, **_kwargs):
        raise AssertionError("the salience strategy must not probe the question")

    monkeypatch.setattr(module, "_question_attention", no_probe)
    with torch.inference_mode():
        ctx = place_chunks(adapter, chunks)
        embeds, positions = _chunk_inputs(adapter, ctx)
        selected = set(_select_salience(adapter, ctx, embeds, positions, count).tolist())
        deviation = module._deviation(adapter, ctx, embeds, positions).cpu()
    spans = starts_and_lengths(chunks)
    assert len(selected) == count
    assert not selected & set(range(spans[0][0], spans[0][0] + spans[0][1]))  # the exact first chunk
    sinks = {i for start, length in spans[1:] for i in range(start, start + min(SALIENCE_SINK_TOKENS, length))}
    assert sinks <= selected
    # The rest: the largest salience x deviation among the other stale tokens.
    score = torch.cat([c.salience for c in chunks]) * deviation
    candidates = [i for i in range(spans[1][0], total) if i not in sinks]
    ranked = sorted(candidates, key=lambda i: -float(score[i]))[: count - len(sinks)]
    assert selected - sinks == set(ranked)


def test_salience_at_full_ratio_equals_full_prefill(tiny, photo):
    adapter = tiny("causal_lm")
    chunks = stored_chunks(adapter, evidence(adapter, photo))
    full = answer(adapter, chunks, QUESTION, options=GenerationOptions(
        max_new_tokens=1, recompute_ratio=1.0, recompute_strategy="query"))
    salient = answer(adapter, chunks, QUESTION, options=GenerationOptions(
        max_new_tokens=1, recompute_ratio=1.0, recompute_strategy="salience"))
    assert (full.first_logits - salient.first_logits).abs().max().item() <= LOGIT_TOL


def test_salience_on_smollm2_is_closer_to_the_full_prefill_than_reuse_without_a_probe():
    """Real weights, the 3 chunks and 4 questions above, r = 0.1: KL(full prefill || placed).
    Measured: reuse 0.156, query 0.055, salience 0.103: on SmolLM2 the question's own probe
    ranks better than the generic one stored with the chunk (on qwen2.5-0.5b they tie:
    docs/evaluation.md). Asserted with room for drift: salience below 0.8x pure reuse and within
    2.5x of query."""
    from personalkv.config import ModelSettings
    from personalkv.models import load_adapter

    adapter = load_adapter("smollm2", settings=ModelSettings())
    texts, questions = SMOLLM2_TEXTS, SMOLLM2_QUESTIONS
    kl = _mean_kl_to_full_prefill(adapter, texts, questions, 0.1, ["query", "salience"])
    reuse = _mean_kl_to_full_prefill(adapter, texts, questions, 0.0, ["salience"])["salience"]
    assert kl["salience"] < 0.8 * reuse and kl["salience"] < 2.5 * kl["query"], (kl, reuse)
