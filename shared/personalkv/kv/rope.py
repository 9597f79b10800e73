"""RoPE position bookkeeping: moving cached keys to new positions.

RoPE stores a key at position p as R(p)·k with R a block rotation by p·θ_i per frequency i, so
moving it to p+δ is one more rotation R(δ): exact, no need for the raw k. For M-RoPE (Qwen2-VL)
each frequency takes its angle from one of three axes; shifting all three axes by the same δ
shifts every frequency by δ·θ_i, i.e. the same 1-D rotation. Angles are computed in float64 and
the rotation is applied in float32, whatever the cache dtype, so bf16 chunks lose nothing extra.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    # The HF/Llama convention: frequencies are laid out as [first half | second half].
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def shift_keys(
    keys: torch.Tensor, delta: int, inv_freq: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Rotate RoPE'd keys ``(..., tokens, head_dim)`` by ``delta`` positions.

    ``inv_freq`` is the model's ``rotary_emb.inv_freq`` (head_dim/2 frequencies for full rotary;
    fewer for partial rotary, in which case the trailing dims are left as they are). ``out``: an
    optional destination (e.g. a slice of the request's cache buffer), saving a copy.
    """
    if delta == 0 and out is None:
        return keys
    half = inv_freq.shape[-1]
    angles = float(delta) * inv_freq.to(torch.float64)
    cos = angles.cos().to(torch.float32).to(keys.device)
    sin = angles.sin().to(torch.float32).to(keys.device)
    if out is None:
        out = torch.empty_like(keys)
    x1, x2 = keys[..., :half].float(), keys[..., half : 2 * half].float()
    out[..., :half] = x1 * cos - x2 * sin
    out[..., half : 2 * half] = x2 * cos + x1 * sin
    if 2 * half < keys.shape[-1]:
        out[..., 2 * half :] = keys[..., 2 * half :]
    return out
