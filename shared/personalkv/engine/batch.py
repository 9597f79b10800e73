"""Continuous-batching decode: requests in their decode phase advance one token per forward.

Each request arrives with its own cache (placed evidence, conversation history, the question:
``PlacedContext``), of its own length, at its own positions. ``DecodeBatch`` lays the rows'
keys and values into one padded cache ``(B, kv_heads, width, head_dim)``, **left-padded** so
that every row's newest token sits in the last column and the next token of every row is
appended at the same column. A 4-D additive mask hides each row's padding; positions are per
row (explicit, as everywhere in ``kv``: the placed chunks' RoPE positions are the row's own,
unaffected by the padding in front of them).

Why padded rows and not a paged layout: the model runs through transformers' decoder stacks
(the same code that placement, recompute and the exactness tests use), which take a dense cache
and a mask; a paged layout would need our own attention kernels for every supported
architecture. The price is a re-layout (one copy of the rows' KV) when the batch's membership
changes, and only between steps in which a request joined or left; between re-layouts the
padded cache grows in place (``HEADROOM`` preallocated columns), so a step writes one column
per layer rather than copying every row's KV as a concatenating cache would.

Exactness: a batch of one (no padding) calls the decoder with no mask, which is the arithmetic
of the solo decode loop (``kv.generation.decode``); a padded row differs from its solo run only
by float rounding (masked columns add exactly zero; batched matmuls may sum in another order),
so greedy answers are the same tokens (tests: tiny models and SmolLM2, mixed lengths).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from personalkv.kv.masks import additive_mask
from personalkv.kv.placement import PlacedContext
from personalkv.models.base import ModelAdapter


#: tokens per row the padded cache has room for before it grows (by doubling): appending a
#: decoded token then writes one column instead of copying every row's KV
HEADROOM = 128


@dataclass(eq=False)
class BatchRow:
    """One request in the decode batch: its context (whose KV lives in the batch meanwhile),
    the token it feeds next and the position that token takes."""

    ctx: PlacedContext
    next_token: int
    position: int
    length: int  # tokens of KV the row holds


class DecodeBatch:
    """The rows decoding together (see the module docstring). Used by one thread."""

    def __init__(self, adapter: ModelAdapter):
        self.adapter = adapter
        self.rows: list[BatchRow] = []
        self._cache = None  # the padded cache, laid out for self._laid_out
        self._laid_out: list[BatchRow] = []
        self._valid: torch.Tensor | None = None  # (B, width) bool: which columns are real

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def tokens(self) -> int:
        """KV tokens the rows hold (padding not counted)."""
        return sum(r.length for r in self.rows)

    def nbytes(self) -> int:
        """Bytes the padded cache has allocated, its room to grow included (what
        ``engine.memory.padded_batch_bytes`` estimates)."""
        if self._cache is None:
            return 0
        return sum(t.numel() * t.element_size() for layer in self._cache.layers
                   for t in (getattr(layer, "_k", layer.keys), getattr(layer, "_v", layer.values)))

    def join(self, ctx: PlacedContext, next_token: int) -> BatchRow:
        """Add a request whose cache is ``ctx`` and whose first generated token is
        ``next_token`` (to be fed at ``ctx.next_position`` by the next ``step``)."""
        row = BatchRow(ctx=ctx, next_token=next_token, position=ctx.next_position, length=ctx.kv_length)
        self.rows.append(row)
        return row

    def leave(self, row: BatchRow, keep: bool) -> None:
        """Remove ``row``. With ``keep`` its KV (everything it fed) goes back into its own
        context, for a conversation to continue from; otherwise it is dropped."""
        if keep and row in self._laid_out:
            i, width = self._laid_out.index(row), self._valid.shape[1]
            kv = []
            for layer in range(self.adapter.num_layers):
                keys, values = self.adapter.cache_kv(self._cache, layer)
                kv.append((keys[i:i + 1, :, width - row.length:].clone(),
                           values[i:i + 1, :, width - row.length:].clone()))
            for layer, (keys, values) in enumerate(kv):
                self.adapter.set_cache_kv(row.ctx.cache, layer, keys, values)
            row.ctx.next_position = row.position
        elif keep:  # joined and left before any step: its own cache is still current
            row.ctx.next_position = row.position
        self.rows.remove(row)

    def step(self) -> torch.Tensor:
        """Feed every row's ``next_token``; returns ``(B, vocab)`` logits in ``self.rows`` order.
        The caller sets each continuing row's ``next_token`` before the next step."""
        if not self.rows:
            raise ValueError("an empty batch has nothing to decode")
        if self._laid_out != self.rows:
            self._lay_out()
        valid = torch.cat([self._valid, self._valid.new_ones(len(self.rows), 1)], dim=1)
        # No padding anywhere (a batch of one, or equal lengths): no mask, as the solo loop.
        # Decided from the rows' lengths on the host: no device sync per step.
        padded = any(r.length != self._valid.shape[1] for r in self.rows)
        mask = additive_mask(valid, self.adapter.dtype)[0, 0][:, None, None, :] if padded else None
        token_ids = torch.tensor([r.next_token for r in self.rows])
        positions = torch.tensor([r.position for r in self.rows])
        logits = self.adapter.decode_step(token_ids, positions, self._cache, mask)
        self._valid = valid
        for row in self.rows:
            row.position += 1
            row.length += 1
        return logits

    def _lay_out(self) -> None:
        """Re-pack the rows' KV into a padded cache as wide as the longest row (one copy)."""
        adapter, rows = self.adapter, self.rows
        old = {id(r): i for i, r in enumerate(self._laid_out)}
        old_width = 0 if self._valid is None else self._valid.shape[1]
        width = max(r.length for r in rows)
        kv = []
        for layer in range(adapter.num_layers):
            sources = []
            for row in rows:
                if id(row) in old:
                    keys, values = adapter.cache_kv(self._cache, layer)
                    i = old[id(row)]
                    sources.append((keys[i, :, old_width - row.length:], values[i, :, old_width - row.length:]))
                else:
                    keys, values = adapter.cache_kv(row.ctx.cache, layer)
                    sources.append((keys[0], values[0]))
            first_k, first_v = sources[0]
            keys = first_k.new_zeros(len(rows), first_k.shape[0], width, first_k.shape[-1])
            values = first_v.new_zeros(len(rows), first_v.shape[0], width, first_v.shape[-1])
            for i, (k, v) in enumerate(sources):
                keys[i, :, width - k.shape[1]:] = k
                values[i, :, width - v.shape[1]:] = v
            kv.append((keys, values))
        self._cache = adapter.new_cache(kv, headroom=HEADROOM)
        for row in rows:  # a joined row's own copy is stale from now on: free it
            if id(row) not in old:
                for layer in range(adapter.num_layers):
                    keys, values = adapter.cache_kv(row.ctx.cache, layer)
                    adapter.set_cache_kv(row.ctx.cache, layer, keys.new_empty(*keys.shape[:2], 0, keys.shape[-1]),
                                         values.new_empty(*values.shape[:2], 0, values.shape[-1]))
        self._valid = torch.zeros(len(rows), width, dtype=torch.bool, device=adapter.device)
        for i, row in enumerate(rows):
            self._valid[i, width - row.length:] = True
        self._laid_out = list(rows)
