"""Placing chunks: system prefix, then each chunk at the next free position, rotated there.

``place_chunks`` is the whole of Jarvis-style reuse: chunk i starts where chunk i-1's position
extent ends (extents, not token counts, because M-RoPE images advance positions by less than
their token count); its keys are rotated by (new start - canonical start), its values copied.
The result is a fresh cache owned by the request (the prefix and chunk tensors are never
mutated), plus the bookkeeping that recompute and the question need.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from personalkv.kv.chunk import KVChunk
from personalkv.kv.rope import shift_keys
from personalkv.models.base import PrefixCache


@dataclass
class PlacedChunk:
    chunk: KVChunk
    kv_start: int  # index of its first token in the placed cache
    positions: torch.Tensor  # (axes, tokens) final positions
    delta: int  # final - canonical

    @property
    def kv_end(self) -> int:
        return self.kv_start + self.chunk.meta.token_count


@dataclass
class PlacedContext:
    """A request's cache after placement: prefix + chunks, and where everything sits."""

    cache: DynamicCache
    prefix_tokens: int
    next_position: int  # first free position after the last chunk
    placed: list[PlacedChunk] = field(default_factory=list)

    @property
    def kv_length(self) -> int:
        return self.cache.get_seq_length()


def chunk_offsets(prefix_extent: int, chunks: list[KVChunk]) -> list[int]:
    """Final start position of every chunk, in order."""
    offsets, position = [], prefix_extent
    for chunk in chunks:
        offsets.append(position)
        position += chunk.meta.position_span
    return offsets


def place_chunks(
    prefix: PrefixCache, chunks: list[KVChunk], inv_freq: torch.Tensor, config=None
) -> PlacedContext:
    for chunk in chunks:
        if chunk.meta.framing != prefix.framing:
            raise ValueError(f"chunk {chunk.chunk_id[:12]} was computed after a different system prefix")
        if chunk.meta.num_layers != len(prefix.keys):
            raise ValueError(f"chunk {chunk.chunk_id[:12]} has {chunk.meta.num_layers} layers, model has {len(prefix.keys)}")
    offsets = chunk_offsets(prefix.extent, chunks)
    placed: list[PlacedChunk] = []
    kv_cursor = prefix.num_tokens
    for chunk, start in zip(chunks, offsets):
        delta = start - chunk.meta.start_position
        placed.append(PlacedChunk(chunk=chunk, kv_start=kv_cursor, positions=chunk.positions + delta, delta=delta))
        kv_cursor += chunk.meta.token_count

    layers = []
    for layer, (prefix_k, prefix_v) in enumerate(zip(prefix.keys, prefix.values)):
        device, dtype = prefix_k.device, prefix_k.dtype
        keys = [prefix_k] + [
            shift_keys(p.chunk.keys[layer].to(device, dtype), p.delta, inv_freq)[None] for p in placed
        ]
        values = [prefix_v] + [p.chunk.values[layer].to(device, dtype)[None] for p in placed]
        layers.append((torch.cat(keys, dim=-2), torch.cat(values, dim=-2)))
    cache = DynamicCache(ddp_cache_data=layers, config=config)
    next_position = offsets[-1] + chunks[-1].meta.position_span if chunks else prefix.extent
    return PlacedContext(cache=cache, prefix_tokens=prefix.num_tokens, next_position=next_position, placed=placed)
