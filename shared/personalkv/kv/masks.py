"""4-D additive attention masks ``(1, 1, queries, keys)``: 0 where allowed, dtype-min elsewhere.

The decoder stacks take such a mask as-is (transformers returns a prepared 4-D mask unchanged),
which is how selective recompute expresses who may see whom.
"""

from __future__ import annotations

import torch


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]

