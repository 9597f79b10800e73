"""4-D additive attention masks ``(1, 1, queries, keys)``: 0 where allowed, dtype-min elsewhere.

The decoder stacks take such a mask as-is (transformers returns a prepared 4-D mask unchanged),
which is how recompute and the block-attention reference express who may see whom.
"""

from __future__ import annotations

import torch


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def block_attention_allowed(prefix_len: int, chunk_lens: list[int], question_len: int) -> torch.Tensor:
    """Who sees whom in block attention: every chunk token sees the prefix and the earlier
    tokens of its own chunk; question tokens see everything before them (causal)."""
    total = prefix_len + sum(chunk_lens) + question_len
    allowed = torch.tril(torch.ones(total, total, dtype=torch.bool))
    start = prefix_len
    for length in chunk_lens:
        allowed[start : start + length, prefix_len:start] = False
        start += length
    return allowed
