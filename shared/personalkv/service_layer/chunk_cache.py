"""An in-memory LRU of decoded KV chunks, in front of the object store, with a byte budget.

Used by ``answering.ask`` only: a hot concept's chunks are fetched and decoded once per
answering process. Entries are keyed by (user, concept, chunk id); chunk ids are content hashes
over the model fingerprint, framing, owner and content, so an entry can never be stale - a
changed chunk has another id. A deleted concept's entries are dropped by ``invalidate_*`` in
the process that deletes; in other processes they are unreachable (the index no longer points
at them) and age out. Thread-safe. Cached chunks are shared read-only: placement copies them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from cachetools import LRUCache

from personalkv.kv.chunk import KVChunk

CacheKey = tuple[str, str, str]  # (user_id, concept_id, chunk_id)


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    entries: int
    bytes: int
    budget_bytes: int
    evictions: int


class _CountingLRU(LRUCache):
    """cachetools' LRU by bytes (``getsizeof`` = the chunk's size) that counts its evictions:
    ``popitem`` is what it calls to make room (cachetools' documented hook)."""

    evictions = 0

    def popitem(self):
        item = super().popitem()
        self.evictions += 1
        return item


class ChunkCache:
    def __init__(self, budget_bytes: int):
        self.budget_bytes = int(budget_bytes)
        self._lru = _CountingLRU(max(self.budget_bytes, 0), getsizeof=KVChunk.nbytes)
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @property
    def evictions(self) -> int:
        return self._lru.evictions

    def get(self, key: CacheKey) -> KVChunk | None:
        with self._lock:
            try:
                chunk = self._lru[key]
            except KeyError:
                self.misses += 1
                return None
            self.hits += 1
            return chunk

    def put(self, key: CacheKey, chunk: KVChunk) -> None:
        with self._lock:
            try:
                self._lru[key] = chunk
            except ValueError:  # cachetools' "value too large"
                pass  # larger than the whole budget: never cached

    def get_or_load(self, key: CacheKey, load: Callable[[], KVChunk]) -> tuple[KVChunk, bool]:
        """The cached chunk, or ``load()``'s (then cached). Returns (chunk, was_hit)."""
        chunk = self.get(key)
        if chunk is not None:
            return chunk, True
        chunk = load()
        self.put(key, chunk)
        return chunk, False

    def invalidate(self, user_id: str, concept_id: str | None = None) -> int:
        """Drop a user's (or one concept's) entries; returns how many."""
        with self._lock:
            doomed = [k for k in self._lru
                      if k[0] == user_id and (concept_id is None or k[1] == concept_id)]
            for key in doomed:
                del self._lru[key]
            return len(doomed)

    def clear(self) -> None:
        with self._lock:
            self._lru.clear()

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self.hits, self.misses, len(self._lru), self._lru.currsize,
                              self.budget_bytes, self.evictions)

    def __len__(self) -> int:
        return len(self._lru)
