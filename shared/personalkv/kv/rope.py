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


def shift_keys(keys: torch.Tensor, delta: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate RoPE'd keys ``(..., tokens, head_dim)`` by ``delta`` positions.

    ``inv_freq`` is the model's ``rotary_emb.inv_freq`` (head_dim/2 frequencies for full rotary;
    fewer for partial rotary, in which case the trailing dims are left as they are).
    """
    if delta == 0:
        return keys
    rotary_dim = 2 * inv_freq.shape[-1]
    angles = float(delta) * inv_freq.to(torch.float64)
    cos = torch.cat((angles.cos(), angles.cos())).to(torch.float32).to(keys.device)
    sin = torch.cat((angles.sin(), angles.sin())).to(torch.float32).to(keys.device)
    rot = keys[..., :rotary_dim].float()
    rotated = rot * cos + rotate_half(rot) * sin
    if rotary_dim == keys.shape[-1]:
        return rotated.to(keys.dtype)
    return torch.cat((rotated.to(keys.dtype), keys[..., rotary_dim:]), dim=-1)
