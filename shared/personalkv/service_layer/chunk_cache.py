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
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

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


class ChunkCache:
    def __init__(self, budget_bytes: int):
        self.budget_bytes = int(budget_bytes)
        self._entries: OrderedDict[CacheKey, tuple[KVChunk, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    def get(self, key: CacheKey) -> KVChunk | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: CacheKey, chunk: KVChunk) -> None:
        size = chunk.nbytes()
        if size > self.budget_bytes:
            return  # larger than the whole budget: never cached
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._entries[key] = (chunk, size)
            self._bytes += size
            while self._bytes > self.budget_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._bytes -= evicted
                self.evictions += 1

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
            doomed = [k for k in self._entries
                      if k[0] == user_id and (concept_id is None or k[1] == concept_id)]
            for key in doomed:
                self._bytes -= self._entries.pop(key)[1]
            return len(doomed)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self.hits, self.misses, len(self._entries), self._bytes,
                              self.budget_bytes, self.evictions)

    def __len__(self) -> int:
        return len(self._entries)
