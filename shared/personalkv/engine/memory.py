"""The engine's memory arithmetic: what a decode batch's KV costs in bytes, and the device
budget it must fit in.

A decode batch (``engine.batch``) holds its rows left-padded in one cache: every row is as wide
as the longest, plus ``HEADROOM`` columns to grow into, so its bytes are

    rows x (longest row + HEADROOM) x bytes_per_token

where ``bytes_per_token`` sums keys and values over every layer (KV heads x head dim x element
size, twice). A row that joins or leaves makes the batch re-lay itself out: for a moment the old
padded cache, the new one and the joining row's own cache all exist. The scheduler admits a
request only if that peak fits the budget left after the process's other KV holders (the
decoded-chunk cache and the live conversations, at their configured byte limits).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from personalkv.engine.batch import HEADROOM

#: share of the device's memory the KV budget takes when none is configured: on CUDA of the
#: memory free when the engine starts (the weights are loaded by then), on CPU of the RAM
AUTO_BUDGET_SHARE_CUDA = 0.8
AUTO_BUDGET_SHARE_CPU = 0.25


def kv_bytes_per_token(adapter) -> int:
    """Bytes one token's keys and values take over every layer (from the system prefix's KV)."""
    prefix = adapter.system_prefix()
    return sum(k.shape[1] * k.shape[-1] * k.element_size() + v.shape[1] * v.shape[-1] * v.element_size()
               for k, v in zip(prefix.keys, prefix.values))


def padded_batch_bytes(lengths: Sequence[int], bytes_per_token: int, headroom: int = HEADROOM) -> int:
    """Bytes of a decode batch laid out for rows of ``lengths`` tokens (module docstring)."""
    return len(lengths) * (max(lengths) + headroom) * bytes_per_token if lengths else 0


def admission_peak_bytes(running: Sequence[int], joining: int, bytes_per_token: int) -> int:
    """Peak bytes while a request whose KV will reach ``joining`` tokens joins rows that will
    reach ``running`` tokens: the old layout, the new one and the joining row's own cache."""
    return (padded_batch_bytes(running, bytes_per_token)
            + padded_batch_bytes([*running, joining], bytes_per_token)
            + joining * bytes_per_token)


def auto_budget_bytes(device: str | torch.device) -> int:
    """The KV budget when none is configured (``AUTO_BUDGET_SHARE_*``)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * AUTO_BUDGET_SHARE_CUDA)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * AUTO_BUDGET_SHARE_CPU)
