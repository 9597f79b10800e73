"""ChunkCache: LRU by bytes, counters, invalidation."""

from __future__ import annotations

import torch
from personalkv.kv.chunk import ChunkMeta, KVChunk
from personalkv.service_layer.chunk_cache import ChunkCache


def chunk(n_tokens: int, tag: str = "c") -> KVChunk:
    meta = ChunkMeta(model_fingerprint="fp", user_id="u", concept_id="c", kind="profile_text",
                     content_hash=tag * 64 if len(tag) == 1 else tag, token_count=n_tokens,
                     start_position=0, position_extent=n_tokens, num_layers=1, dtype="float32",
                     position_axes=1, framing="f")
    kv = torch.zeros(1, n_tokens, 4)
    return KVChunk(meta=meta, keys=[kv], values=[kv.clone()],
                   positions=torch.arange(n_tokens)[None], token_ids=torch.zeros(n_tokens, dtype=torch.long))


def test_hits_misses_and_lru_eviction_by_bytes():
    one = chunk(10).nbytes()
    cache = ChunkCache(budget_bytes=2 * one)
    cache.put(("u", "c", "a"), chunk(10))
    cache.put(("u", "c", "b"), chunk(10))
    assert cache.get(("u", "c", "a")) is not None  # a is now most recent
    cache.put(("u", "c", "c"), chunk(10))  # evicts b
    assert cache.get(("u", "c", "b")) is None
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.entries, stats.evictions) == (1, 1, 2, 1)
    assert stats.bytes == 2 * one <= stats.budget_bytes


def test_get_or_load_loads_once():
    cache = ChunkCache(budget_bytes=10**6)
    calls = []
    load = lambda: calls.append(1) or chunk(5)
    first, hit1 = cache.get_or_load(("u", "c", "x"), load)
    second, hit2 = cache.get_or_load(("u", "c", "x"), load)
    assert (hit1, hit2, len(calls)) == (False, True, 1) and first is second


def test_oversized_chunk_is_not_cached_and_zero_budget_disables():
    cache = ChunkCache(budget_bytes=chunk(10).nbytes() - 1)
    cache.put(("u", "c", "a"), chunk(10))
    assert len(cache) == 0
    off = ChunkCache(budget_bytes=0)
    off.put(("u", "c", "a"), chunk(1))
    assert len(off) == 0


def test_invalidate_concept_and_user():
    cache = ChunkCache(budget_bytes=10**6)
    for key in [("u", "c1", "a"), ("u", "c2", "b"), ("v", "c1", "c")]:
        cache.put(key, chunk(3))
    assert cache.invalidate("u", "c1") == 1
    assert cache.invalidate("u") == 1
    assert len(cache) == 1 and cache.get(("v", "c1", "c")) is not None
    assert cache.stats().bytes == chunk(3).nbytes()
