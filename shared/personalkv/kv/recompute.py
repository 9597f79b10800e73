"""Selective recompute: refresh a share r of the placed chunks' tokens against the full context.

Placed chunks never saw each other (each was computed after the prefix alone), so cross-chunk
attention is missing from their KV. Recomputing the tokens whose KV would change most restores
most of it at a fraction of a prefill (CacheBlend, Yao et al. 2024). Strategies:

* ``deviation`` (CacheBlend-style): the tokens whose KV would deviate most, measured where the
  deviation starts: layer 0's attention output with the other chunks visible vs. without them.
  Costs a query projection and two attention passes, well under one decoder layer.
* ``first`` (EPIC-style): the first ceil(r * len) tokens of every chunk, where the attention-sink
  effect of a chunk's missing context concentrates.

The selected tokens then run through every layer as queries over [prefix, reused tokens, selected
tokens], each seeing exactly what it would see in a full prefill; their fresh KV replaces the
stale entries in place. r=0 is pure reuse; r=1 is a full prefill of the chunks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from personalkv.kv.masks import additive_mask
from personalkv.kv.placement import PlacedContext
from personalkv.kv.rope import rotate_half

STRATEGIES = ("deviation", "first")


def _chunk_inputs(adapter, ctx: PlacedContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Input embeddings ``(1, T, hidden)`` and final positions ``(axes, T)`` of all placed tokens."""
    embeds = [adapter.embed(p.chunk.token_ids, p.chunk.image_embeds) for p in ctx.placed]
    positions = [p.positions.to(adapter.device) for p in ctx.placed]
    return torch.cat(embeds, dim=1), torch.cat(positions, dim=1)


def _select_first(ctx: PlacedContext, ratio: float) -> torch.Tensor:
    picked, offset = [], 0
    for p in ctx.placed:
        length = p.chunk.meta.token_count
        picked.append(torch.arange(offset, offset + min(length, math.ceil(ratio * length))))
        offset += length
    return torch.cat(picked)


def _select_deviation(adapter, ctx: PlacedContext, embeds, positions, count: int) -> torch.Tensor:
    """Tokens whose layer-0 attention output changes most when they may also see the other chunks.

    Layer 0's keys and values depend only on each token and its position, so the placed cache
    already holds the exact layer-0 KV; the first difference between reuse and a full prefill
    is layer 0's attention output, which then drives every later layer's KV deviation. Comparing
    the two attention outputs costs a query projection and two attention passes (no MLP),
    a fraction of one decoder layer.
    """
    prefix_len, total = ctx.prefix_tokens, embeds.shape[1]
    layer = adapter.decoder_layers[0]
    attn = layer.self_attn
    head_dim = attn.head_dim
    query = attn.q_proj(layer.input_layernorm(embeds)).view(1, total, -1, head_dim).transpose(1, 2)
    cos, sin = adapter.language_model.rotary_emb(embeds, adapter.lm_position_ids(positions))
    cos, sin = cos[:, None].to(query.dtype), sin[:, None].to(query.dtype)
    query = query * cos + rotate_half(query) * sin
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
    scale = getattr(attn, "scaling", head_dim**-0.5)
    out_full = F.scaled_dot_product_attention(query, keys, values, attn_mask=full, scale=scale)
    out_block = F.scaled_dot_product_attention(query, keys, values, attn_mask=block, scale=scale)
    deviation = (out_full - out_block).float().pow(2).sum(dim=(1, 3))[0]
    return torch.topk(deviation, count).indices.sort().values.cpu()


def recompute(adapter, ctx: PlacedContext, ratio: float, strategy: str = "deviation") -> int:
    """Recompute ``ratio`` of the placed chunk tokens in place; returns how many were recomputed."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown recompute strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"recompute ratio must be within [0, 1], got {ratio}")
    total = sum(p.chunk.meta.token_count for p in ctx.placed)
    count = min(total, math.ceil(ratio * total))
    if count == 0:
        return 0
    with torch.inference_mode():
        embeds, positions = _chunk_inputs(adapter, ctx)
        if count == total:
            selected = torch.arange(total)
        elif strategy == "first":
            selected = _select_first(ctx, ratio)
        else:
            selected = _select_deviation(adapter, ctx, embeds, positions, count)
        _recompute_selected(adapter, ctx, embeds, positions, selected)
    return int(selected.numel())


def _recompute_selected(adapter, ctx: PlacedContext, embeds, positions, selected: torch.Tensor) -> None:
    prefix_len, total = ctx.prefix_tokens, embeds.shape[1]
    kv_len = prefix_len + total
    n = selected.numel()
    device = embeds.device
    selected = selected.to(device)
    is_selected = torch.zeros(total, dtype=torch.bool, device=device)
    is_selected[selected] = True
    chunk_index = torch.arange(total, device=device)

    allowed = torch.zeros(n, kv_len + n, dtype=torch.bool, device=device)
    allowed[:, :prefix_len] = True
    # Reused tokens before the query, minus stale copies of the tokens being recomputed.
    allowed[:, prefix_len:kv_len] = (chunk_index[None, :] < selected[:, None]) & ~is_selected[None, :]
    # Fresh selected tokens up to and including the query itself.
    allowed[:, kv_len:] = selected[None, :] <= selected[:, None]

    adapter.run_decoder(
        embeds[:, selected], positions[:, selected], ctx.cache, additive_mask(allowed, embeds.dtype)
    )
    target = prefix_len + selected
    for layer in range(adapter.num_layers):
        keys, values = adapter.cache_kv(ctx.cache, layer)
        keys[..., target, :] = keys[..., kv_len:, :]
        values[..., target, :] = values[..., kv_len:, :]
        adapter.set_cache_kv(ctx.cache, layer, keys[..., :kv_len, :], values[..., :kv_len, :])
