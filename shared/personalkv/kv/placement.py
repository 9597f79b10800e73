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
from personalkv.kv.chunk import KVChunk
from personalkv.kv.rope import shift_keys


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

    cache: object  # the adapter's cache type (transformers DynamicCache)
    prefix_tokens: int
    next_position: int  # first free position after the last chunk
    placed: list[PlacedChunk] = field(default_factory=list)
    #: a selective recompute that runs fused with the next prefill (``kv.recompute``): at most
    #: one entry; a list so that views of the same cache (``append_chunks``) share it
    pending_recompute: list = field(default_factory=list)

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


def place_chunks(adapter, chunks: list[KVChunk]) -> PlacedContext:
    """Build the request's cache: system prefix, then every chunk rotated to its final place."""
    prefix = adapter.system_prefix()
    for chunk in chunks:
        if chunk.meta.framing != prefix.framing:
            raise ValueError(f"chunk {chunk.chunk_id[:12]} was computed after a different system prefix")
        if chunk.meta.num_layers != len(prefix.keys):
            raise ValueError(
                f"chunk {chunk.chunk_id[:12]} has {chunk.meta.num_layers} layers, model has {len(prefix.keys)}"
            )
    offsets = chunk_offsets(prefix.extent, chunks)
    placed: list[PlacedChunk] = []
    kv_cursor = prefix.num_tokens
    for chunk, start in zip(chunks, offsets):
        delta = start - chunk.meta.start_position
        placed.append(PlacedChunk(chunk=chunk, kv_start=kv_cursor, positions=chunk.positions + delta, delta=delta))
        kv_cursor += chunk.meta.token_count

    layers = []
    for layer, (prefix_k, prefix_v) in enumerate(zip(prefix.keys, prefix.values)):
        # One buffer per layer, written in place: no per-chunk temporaries, no second copy.
        heads, head_dim = prefix_k.shape[1], prefix_k.shape[-1]
        keys = prefix_k.new_empty(1, heads, kv_cursor, head_dim)
        values = prefix_v.new_empty(1, heads, kv_cursor, prefix_v.shape[-1])
        keys[..., : prefix.num_tokens, :] = prefix_k
        values[..., : prefix.num_tokens, :] = prefix_v
        for p in placed:
            source = p.chunk.keys[layer].to(keys.device)
            shift_keys(source, p.delta, adapter.layer_inv_freq(layer), out=keys[0, :, p.kv_start : p.kv_end, :])
            values[0, :, p.kv_start : p.kv_end, :] = p.chunk.values[layer]
        layers.append((keys, values))
    next_position = offsets[-1] + chunks[-1].meta.position_span if chunks else prefix.extent
    return PlacedContext(
        cache=adapter.new_cache(layers), prefix_tokens=prefix.num_tokens, next_position=next_position, placed=placed
    )
