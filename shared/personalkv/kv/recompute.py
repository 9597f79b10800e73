"""Selective recompute: refresh a share r of the placed chunks' tokens against the full context.

Placed chunks never saw each other (each was computed after the prefix alone), so cross-chunk
attention is missing from their KV. Recomputing the tokens whose KV matters most restores most of
it at a fraction of a prefill. The budget is ceil(r * placed tokens); strategies:

* ``deviation`` (CacheBlend, Yao et al. 2024): the tokens whose KV would deviate most, measured
  where the deviation starts: layer 0's attention output with the other chunks visible vs.
  without them. Costs a query projection and two attention passes, well under one decoder layer.
  Question-blind.
* ``first`` (EPIC, Hu et al. 2024): the first ceil(r * len) tokens of every chunk, where the
  attention-sink effect of a chunk's missing context concentrates.
* ``query`` (question-aware, after ProphetKV and QCFuse, 2025): a token's stale KV only hurts
  the answer as much as the question reads it, so the question chooses. A probe runs the
  question's tokens through the lower ``PROBE_SHARE`` of the decoder layers over the placed
  (reused) cache and measures the attention the question pays each placed token (softmax
  probabilities, averaged over heads and question tokens, summed over the probed layers); the
  probe's KV is dropped again and the question is prefilled after the recompute. A token's score
  is that attention times its ``deviation`` (how stale its KV is): the first-order change of the
  question's attention output when the token's KV is refreshed. Attention alone won at 3 chunks
  but lost to ``deviation`` at 10, the product beat both (SmolLM2 x Yo'LLaVA, r = 0.15: mean KL
  0.0078 vs 0.0074 / 0.0174 at 3 chunks, 0.0275 vs 0.0485 / 0.0364 at 10). As in
  EPIC, the first ``SINK_TOKENS`` of every chunk are always in the set (a chunk computed
  alone treats its own start as an attention sink); the rest of the budget goes to the
  highest-scoring tokens. VLCache (2025) reports the same for VLMs: a small, early-weighted
  budget reaches near full-prefill quality. Where placement is already exact nothing is
  spent: the first chunk directly behind the system prefix sees exactly what it saw when it was
  computed (so one placed chunk recomputes nothing), and its budget share goes to the others.
* ``salience`` (the default): ``query``'s ranking with the probe moved to caching time. When a
  chunk is encoded, the probe runs once over the chunk alone with a generic question
  (``SALIENCE_QUESTION``) and the attention it pays each token is stored in the chunk
  (``KVChunk.salience``). What a question reads of a profile (its name, its facts, its sinks)
  depends little on the question, so an Ask ranks stale tokens by stored salience x deviation
  without probing (the probe costs 2/3 of a question prefill), with ``SALIENCE_SINK_TOKENS``
  first tokens per chunk. On the grounded dev pilot (qwen2.5-0.5b, r = 0.1) it was as faithful
  as ``query`` and 0.1-0.2 s faster (docs/evaluation.md, 'Grounded QA').

The selected tokens then run through every layer as queries over [prefix, reused tokens, selected
tokens], each seeing exactly what it would see in a full prefill and keeping its position; their
fresh KV replaces the stale entries in place. When the question is known (``ConversationKV``
passes it) that forward is the question's own prefill: selected tokens and question run as one
batch of queries, the question seeing the recomputed KV, so the recompute costs its tokens'
share of one pass over the weights rather than a pass of its own (``run_with_pending_recompute``;
on a CPU a forward of a few dozen tokens costs about one weight pass whatever its length).
r=0 is pure reuse; r=1 is a full prefill of the chunks (``query``: of every chunk but an exact
first one, which is the same KV).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from personalkv.kv.masks import additive_mask
from personalkv.kv.placement import PlacedContext, place_chunks
from personalkv.kv.rope import rotate_half

STRATEGIES = ("deviation", "first", "query", "salience")
#: ``query``: tokens at the start of every chunk that are always recomputed (EPIC's sink
#: tokens). 1 measured best on SmolLM2 x Yo'LLaVA (3 chunks, r = 0.05-0.15; 2, 4 and 8 worse).
SINK_TOKENS = 1
#: ``query``: share of the decoder layers (from the bottom) that the question's probe runs
#: through. SmolLM2, 3 chunks, r = 0.15: mean KL 0.0109 / 0.0105 / 0.0074 / 0.0064 with 8 / 12 /
#: 20 / 30 of its 30 layers; the probe's cost grows with its depth.
PROBE_SHARE = 2 / 3
#: ``salience``: the question whose probe over a chunk alone measures its salience (stored with
#: the chunk; see ``chunk_salience``), and the sink tokens recomputed per chunk.
SALIENCE_QUESTION = "Tell me everything about this."
SALIENCE_SINK_TOKENS = 4


def _chunk_inputs(adapter, ctx: PlacedContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Input embeddings ``(1, T, hidden)`` and final positions ``(axes, T)`` of all placed tokens."""
    embeds = [adapter.embed(p.chunk.token_ids, p.chunk.image_embeds) for p in ctx.placed]
    positions = [p.positions.to(adapter.device) for p in ctx.placed]
    return torch.cat(embeds, dim=1), torch.cat(positions, dim=1)


def _exact_tokens(adapter, ctx: PlacedContext) -> int:
    """How many leading placed tokens already hold exactly their full-prefill KV: the first
    chunk's when it sits directly behind the system prefix at its canonical position."""
    if ctx.placed and ctx.placed[0].delta == 0 and ctx.placed[0].kv_start == adapter.system_prefix().num_tokens:
        return ctx.placed[0].chunk.meta.token_count
    return 0


def _select_first(ctx: PlacedContext, ratio: float) -> torch.Tensor:
    picked, offset = [], 0
    for p in ctx.placed:
        length = p.chunk.meta.token_count
        picked.append(torch.arange(offset, offset + min(length, math.ceil(ratio * length))))
        offset += length
    return torch.cat(picked)


def _rotated_queries(adapter, layer: int, normed: torch.Tensor, rotary) -> torch.Tensor:
    """Layer ``layer``'s RoPE-rotated queries ``(1, heads, T, head_dim)`` of the normed inputs
    ``normed`` ``(1, T, hidden)``, rotated by ``rotary`` (``adapter.layer_rotary`` at their
    positions): the queries its attention computes."""
    attn = adapter.decoder_layers[layer].self_attn
    query = attn.q_proj(normed).view(1, normed.shape[1], -1, attn.head_dim).transpose(1, 2)
    if getattr(attn, "q_norm", None) is not None:  # Gemma 3 normalizes queries before RoPE
        query = attn.q_norm(query)
    cos, sin = rotary
    cos, sin = cos[:, None].to(query.dtype), sin[:, None].to(query.dtype)
    return query * cos + rotate_half(query) * sin


def _select_deviation(adapter, ctx: PlacedContext, embeds, positions, count: int) -> torch.Tensor:
    """The ``count`` tokens of largest ``_deviation``."""
    return torch.topk(_deviation(adapter, ctx, embeds, positions), count).indices.sort().values.cpu()


def _deviation(adapter, ctx: PlacedContext, embeds, positions) -> torch.Tensor:
    """``(placed tokens,)``: how much each token's layer-0 attention output changes when it may
    also see the other chunks.

    Layer 0's keys and values depend only on each token and its position, so the placed cache
    already holds the exact layer-0 KV; the first difference between reuse and a full prefill
    is layer 0's attention output, which then drives every later layer's KV deviation. Comparing
    the two attention outputs costs a query projection and two attention passes (no MLP),
    a fraction of one decoder layer.
    """
    prefix_len, total = ctx.prefix_tokens, embeds.shape[1]
    layer = adapter.decoder_layers[0]
    attn = layer.self_attn
    query = _rotated_queries(adapter, 0, layer.input_layernorm(embeds),
                             adapter.layer_rotary(embeds, positions, 0))
    keys, values = adapter.cache_kv(ctx.cache, 0)
    groups = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)

    device = embeds.device
    owner = torch.cat(
        [torch.full((p.chunk.meta.token_count,), i, device=device) for i, p in enumerate(ctx.placed)]
    )
    causal = torch.tril(torch.ones(total, total, dtype=torch.bool, device=device))
    full = torch.ones(total, prefix_len + total, dtype=torch.bool, device=device)
    full[:, prefix_len:] = causal
    block = full.clone()
    block[:, prefix_len:] &= owner[:, None] == owner[None, :]
    scale = getattr(attn, "scaling", attn.head_dim**-0.5)
    out_full = F.scaled_dot_product_attention(query, keys, values, attn_mask=full, scale=scale)
    out_block = F.scaled_dot_product_attention(query, keys, values, attn_mask=block, scale=scale)
    return (out_full - out_block).float().pow(2).sum(dim=(1, 3))[0]


def probe_layers(adapter) -> int:
    """How many decoder layers the ``query`` probe runs through."""
    return max(1, math.ceil(PROBE_SHARE * adapter.num_layers))


def _question_attention(adapter, ctx: PlacedContext, question) -> torch.Tensor:
    """``(placed tokens,)``: the attention the question pays each placed token in a probe through
    the lower ``PROBE_SHARE`` of the layers over the cache as placed. Each layer's attention
    probabilities (the question's own tokens included as keys, causally) are averaged over heads
    and question tokens and summed over layers. The probe's KV is removed again."""
    kv_len = ctx.kv_length
    positions, _ = adapter.segment_positions(question, ctx.next_position)
    hidden = adapter.embed(question.token_ids, question.image_embeds())
    n = hidden.shape[1]
    allowed = torch.ones(n, kv_len + n, dtype=torch.bool, device=hidden.device)
    allowed[:, kv_len:] = torch.tril(allowed[:, kv_len:])
    mask = additive_mask(allowed, hidden.dtype)
    decoder_mask = adapter.decoder_mask(mask, positions, ctx.cache)
    scores = torch.zeros(kv_len, dtype=torch.float32, device=hidden.device)
    layers = probe_layers(adapter)
    try:
        for index in range(layers):
            layer = adapter.decoder_layers[index]
            rotary = adapter.layer_rotary(hidden, positions, index)  # the queries' and the layer's
            query = _rotated_queries(adapter, index, layer.input_layernorm(hidden), rotary)
            # The model's own layer, so the next layer's input is exactly the prefill's; it
            # appends the question's keys, which this layer's probabilities then include.
            layer_mask = adapter.layer_mask(decoder_mask, index)
            hidden = layer(hidden, attention_mask=layer_mask, position_embeddings=rotary, cache=ctx.cache,
                           use_cache=True)
            keys = adapter.cache_kv(ctx.cache, index)[0]
            keys = keys.repeat_interleave(query.shape[1] // keys.shape[1], dim=1)
            attn = layer.self_attn
            logits = (query @ keys.transpose(-1, -2)).float() * getattr(attn, "scaling", attn.head_dim**-0.5)
            probs = torch.softmax(logits + layer_mask.float(), dim=-1)
            scores += probs[0, :, :, :kv_len].mean(dim=(0, 1))
    finally:
        for index in range(layers):
            keys, values = adapter.cache_kv(ctx.cache, index)
            adapter.set_cache_kv(ctx.cache, index, keys[..., :kv_len, :], values[..., :kv_len, :])
    return scores[ctx.prefix_tokens:]


def _select_ranked(adapter, ctx: PlacedContext, count: int, sinks_per_chunk: int, scores) -> torch.Tensor:
    """Every non-exact chunk's first ``sinks_per_chunk`` tokens, then the tokens of largest
    ``scores()`` (``(placed tokens,)``, called only when budget is left); at most ``count``."""
    exact = _exact_tokens(adapter, ctx)
    starts, offset = [], 0
    for p in ctx.placed:
        if offset >= exact:
            starts.append((offset, p.chunk.meta.token_count))
        offset += p.chunk.meta.token_count
    candidates = offset - exact
    count = min(count, candidates)
    if count == 0:
        return torch.zeros(0, dtype=torch.long)
    # The sinks share the budget evenly when it cannot hold them all.
    per_chunk = min(sinks_per_chunk, max(1, count // len(starts)))
    sinks = torch.cat([torch.arange(start, start + min(per_chunk, length)) for start, length in starts])[:count]
    rest = count - sinks.numel()
    if rest == 0:
        return sinks.sort().values
    ranked = scores().cpu()
    ranked[:exact] = -math.inf
    ranked[sinks] = -math.inf
    return torch.cat([sinks, torch.topk(ranked, rest).indices]).sort().values


def _select_query(adapter, ctx: PlacedContext, question, embeds, positions, count: int) -> torch.Tensor:
    """``SINK_TOKENS`` per chunk, then the tokens of largest question attention x deviation (see
    the module docstring)."""
    return _select_ranked(adapter, ctx, count, SINK_TOKENS, lambda: _question_attention(adapter, ctx, question)
                          * _deviation(adapter, ctx, embeds, positions))


def _select_salience(adapter, ctx: PlacedContext, embeds, positions, count: int) -> torch.Tensor:
    """``SALIENCE_SINK_TOKENS`` per chunk, then the tokens of largest stored salience x deviation:
    the ``query`` ranking with the question's probe replaced by one measured at caching time."""
    def scores():
        salience = torch.cat([salience_of(adapter, p.chunk) for p in ctx.placed]).to(embeds.device)
        return salience * _deviation(adapter, ctx, embeds, positions)
    return _select_ranked(adapter, ctx, count, SALIENCE_SINK_TOKENS, scores)


def chunk_salience(adapter, chunk) -> torch.Tensor:
    """``(tokens,)`` float32: the attention ``SALIENCE_QUESTION`` pays each of the chunk's tokens
    in the ``query`` probe over the chunk placed alone (at its canonical place). Computed when the
    chunk is encoded and stored with it: what a question about a chunk reads of it (its name, its
    facts, its sinks) depends little on which question, and this costs the Ask nothing."""
    with torch.inference_mode():
        ctx = place_chunks(adapter, [chunk])
        question = adapter.build_segment(adapter.question_parts(SALIENCE_QUESTION))
        return _question_attention(adapter, ctx, question).float().cpu()


def salience_of(adapter, chunk) -> torch.Tensor:
    """The chunk's stored salience; measured now (and kept on the chunk object, which the
    decoded-chunk cache holds) for a chunk stored before salience existed."""
    if chunk.salience is None:
        chunk.salience = chunk_salience(adapter, chunk)
    return chunk.salience


def recompute(adapter, ctx: PlacedContext, ratio: float, strategy: str = "deviation", question=None) -> int:
    """Recompute ``ratio`` of the placed chunk tokens; returns how many were (or will be) recomputed.

    ``question``: the ``Segment`` prefilled next behind the chunks. ``query`` selects with it;
    and when it is given, the selected tokens' forward is left pending on ``ctx`` and runs fused
    with that next ``prefill`` (one pass over the weights instead of two: see
    ``run_with_pending_recompute``). Without it the recompute runs here and now."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown recompute strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"recompute ratio must be within [0, 1], got {ratio}")
    if strategy == "query" and question is None:
        raise ValueError("the 'query' recompute strategy needs the question")
    if ctx.pending_recompute:
        raise ValueError("a recompute is already pending on this cache")
    total = sum(p.chunk.meta.token_count for p in ctx.placed)
    count = min(total, math.ceil(ratio * total))
    if count == 0:
        return 0
    with torch.inference_mode():
        embeds, positions = _chunk_inputs(adapter, ctx)
        if strategy == "query":
            selected = _select_query(adapter, ctx, question, embeds, positions, count)
        elif strategy == "salience":
            selected = _select_salience(adapter, ctx, embeds, positions, count)
        elif count == total:
            selected = torch.arange(total)
        elif strategy == "first":
            selected = _select_first(ctx, ratio)
        else:
            selected = _select_deviation(adapter, ctx, embeds, positions, count)
        if selected.numel() == 0:
            return 0
        if question is None:
            _recompute_selected(adapter, ctx, embeds, positions, selected)
        else:  # runs inside the question's prefill (run_with_pending_recompute)
            ctx.pending_recompute.append(_pending(ctx, embeds, positions, selected))
    return int(selected.numel())


def _recompute_selected(adapter, ctx: PlacedContext, embeds, positions, selected: torch.Tensor) -> None:
    """Recompute the placed tokens ``selected`` now (their forward alone)."""
    _fused_forward(adapter, ctx.cache, _pending(ctx, embeds, positions, selected), embeds[:, :0], positions[:, :0])


@dataclass
class PendingRecompute:
    """Selected placed tokens whose forward has not run yet."""

    prefix_tokens: int  # cache tokens before the placed chunks (context they all see)
    kv_length: int  # cache length when selected; the next forward must start there
    selected: torch.Tensor  # indices among the placed tokens, ascending
    embeds: torch.Tensor  # (1, n, hidden) their input embeddings
    positions: torch.Tensor  # (axes, n) their final positions


def _pending(ctx: PlacedContext, embeds, positions, selected: torch.Tensor) -> PendingRecompute:
    selected = selected.to(embeds.device)
    return PendingRecompute(prefix_tokens=ctx.prefix_tokens, kv_length=ctx.kv_length, selected=selected,
                            embeds=embeds[:, selected], positions=positions[:, selected])


def run_with_pending_recompute(adapter, ctx: PlacedContext, embeds: torch.Tensor,
                               positions: torch.Tensor) -> torch.Tensor:
    """Prefill a segment (``embeds`` at ``positions``) and run the recompute pending on ``ctx``
    in one forward; returns the segment's hidden states. Exact: each recomputed token sees what
    it would see alone (below), and the segment sees the cache as it is after the recompute
    (reused tokens, fresh selected tokens, never their stale copies). On a CPU a forward of a few
    dozen tokens costs about one pass over the weights whatever its length, so a recompute run
    on its own costs about a second prefill."""
    pending = ctx.pending_recompute.pop()
    return _fused_forward(adapter, ctx.cache, pending, embeds, positions)


def _fused_forward(adapter, cache, pending: PendingRecompute, embeds, positions) -> torch.Tensor:
    """One decoder pass over [selected tokens, segment]: the selected tokens as queries over
    [context, reused tokens before them, fresh selected tokens up to themselves], the segment over
    everything but the stale copies; the fresh KV then replaces the stale entries in place and
    the segment's KV follows the placed tokens, so the cache has no gaps."""
    prefix_len, kv_len, selected = pending.prefix_tokens, pending.kv_length, pending.selected
    if cache.get_seq_length() != kv_len:
        raise ValueError("the cache changed between selecting and recomputing")
    n, m = selected.numel(), embeds.shape[1]
    device = pending.embeds.device
    total = kv_len - prefix_len
    is_selected = torch.zeros(total, dtype=torch.bool, device=device)
    is_selected[selected] = True
    token = torch.arange(total, device=device)

    allowed = torch.zeros(n + m, kv_len + n + m, dtype=torch.bool, device=device)
    allowed[:, :prefix_len] = True
    # Selected tokens: reused tokens before them (minus stale copies), fresh ones up to themselves.
    allowed[:n, prefix_len:kv_len] = (token[None, :] < selected[:, None]) & ~is_selected[None, :]
    allowed[:n, kv_len:kv_len + n] = selected[None, :] <= selected[:, None]
    # The segment: every reused and every fresh placed token, then itself causally.
    allowed[n:, prefix_len:kv_len] = ~is_selected[None, :]
    allowed[n:, kv_len:kv_len + n] = True
    allowed[n:, kv_len + n:] = torch.tril(torch.ones(m, m, dtype=torch.bool, device=device))

    hidden = adapter.run_decoder(torch.cat([pending.embeds, embeds], dim=1),
                                 torch.cat([pending.positions, positions], dim=1), cache,
                                 additive_mask(allowed, pending.embeds.dtype))
    target = prefix_len + selected
    for layer in range(adapter.num_layers):
        keys, values = adapter.cache_kv(cache, layer)
        for tensor in (keys, values):
            # clone: with one KV head (Gemma 3 270M) the source slice is contiguous memory of
            # the same tensor, which an indexed write refuses to read from
            tensor[..., target, :] = tensor[..., kv_len:kv_len + n, :].clone()
            if m:  # the segment moves down over the fresh copies (clone: the ranges may overlap)
                tensor[..., kv_len:kv_len + m, :] = tensor[..., kv_len + n:, :].clone()
        adapter.set_cache_kv(cache, layer, keys[..., :kv_len + m, :], values[..., :kv_len + m, :])
    return hidden[:, n:]
