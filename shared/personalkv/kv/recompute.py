"""Selective recompute: refresh a share r of the placed chunks' tokens against the full context.

Placed chunks never saw each other (each was computed after the prefix alone), so cross-chunk
attention is missing from their KV. Recomputing the tokens whose KV would change most restores
most of it at a fraction of a prefill (CacheBlend, Yao et al. 2024). Strategies:

* ``deviation`` (CacheBlend-style): run layer 0 over all chunk tokens with full causal attention,
  project layer 1's values, and pick the tokens whose fresh values deviate most from the reused
  ones (values carry no RoPE, so the comparison needs no position handling). Costs one layer.
* ``first`` (EPIC-style): the first ceil(r * len) tokens of every chunk, where the attention-sink
  effect of a chunk's missing context concentrates.

The selected tokens then run through every layer as queries over [prefix, reused tokens, selected
tokens], each seeing exactly what it would see in a full prefill; their fresh KV replaces the
stale entries in place. r=0 is pure reuse; r=1 is a full prefill of the chunks.
"""

from __future__ import annotations

import math

import torch
from transformers import DynamicCache

from personalkv.kv.masks import additive_mask
from personalkv.kv.placement import PlacedContext

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
    if adapter.num_layers < 2:
        raise ValueError("deviation-based recompute needs a model with at least two layers")
    prefix_len, total = ctx.prefix_tokens, embeds.shape[1]
    layer0, layer1 = adapter.decoder_layers[0], adapter.decoder_layers[1]
    first = ctx.cache.layers[0]
    scratch = DynamicCache(
        ddp_cache_data=[(first.keys[..., :prefix_len, :], first.values[..., :prefix_len, :])]
    )
    allowed = torch.ones(total, prefix_len + total, dtype=torch.bool, device=embeds.device)
    allowed[:, prefix_len:] = torch.tril(allowed[:, prefix_len:])
    position_embeddings = adapter.language_model.rotary_emb(embeds, adapter.lm_position_ids(positions))
    hidden = layer0(
        embeds,
        attention_mask=additive_mask(allowed, embeds.dtype),
        cache=scratch,
        use_cache=True,
        position_embeddings=position_embeddings,
    )
    fresh = layer1.self_attn.v_proj(layer1.input_layernorm(hidden))[0].float()  # (T, kv_heads*head_dim)
    reused = ctx.cache.layers[1].values[0, :, prefix_len : prefix_len + total, :]  # (heads, T, dim)
    reused = reused.transpose(0, 1).reshape(total, -1).float()
    deviation = (fresh - reused).norm(dim=-1)
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
    for layer in ctx.cache.layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name)
            tensor[..., target, :] = tensor[..., kv_len:, :]
            setattr(layer, name, tensor[..., :kv_len, :])
