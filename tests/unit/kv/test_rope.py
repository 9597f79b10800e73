"""RoPE shift: rotating cached keys equals computing them at the new positions."""

from __future__ import annotations

import torch

from personalkv.kv.rope import rotate_half, shift_keys


def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    angles = positions[:, None].double() * inv_freq[None].double()
    cos = torch.cat((angles.cos(), angles.cos()), -1).float()
    sin = torch.cat((angles.sin(), angles.sin()), -1).float()
    return x * cos + rotate_half(x) * sin


def test_shift_equals_rope_at_new_positions():
    gen = torch.Generator().manual_seed(1)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 32, 2).float() / 32))
    raw = torch.randn(4, 10, 32, generator=gen)
    positions = torch.arange(5, 15)
    for delta in (1, 17, 1234, -3):
        shifted = shift_keys(rope(raw, positions, inv_freq), delta, inv_freq)
        expected = rope(raw, positions + delta, inv_freq)
        assert (shifted - expected).abs().max() < 1e-5


def test_shifts_compose_and_zero_is_identity():
    gen = torch.Generator().manual_seed(2)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    keys = torch.randn(2, 5, 16, generator=gen)
    assert shift_keys(keys, 0, inv_freq) is keys
    twice = shift_keys(shift_keys(keys, 40, inv_freq), 60, inv_freq)
    assert (twice - shift_keys(keys, 100, inv_freq)).abs().max() < 1e-5


def test_shift_keeps_dtype_and_partial_rotary_tail():
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))  # rotary over 8 of 16 dims
    keys = torch.randn(1, 3, 16).to(torch.bfloat16)
    shifted = shift_keys(keys, 9, inv_freq)
    assert shifted.dtype == torch.bfloat16
    assert torch.equal(shifted[..., 8:], keys[..., 8:])
    assert not torch.equal(shifted[..., :8], keys[..., :8])
