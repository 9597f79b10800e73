"""The live conversations' KV of one answering process: bounded by bytes, dropped when idle,
least recently used first; and which conversations have a turn running right now.

Used by ``conversations`` only. A turn takes its conversation's ``ConversationKV`` out
(``take``) and puts it back when the turn is recorded (``keep``), so the cache never holds a
cache that is being extended and a failed turn leaves nothing half-updated behind: the next turn
rebuilds from the record. Thread-safe.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from cachetools import TTLCache

from personalkv.kv.conversation import ConversationKV

Key = tuple[str, str]  # (user id, conversation id)


@dataclass(frozen=True)
class ConversationCacheStats:
    entries: int
    bytes: int
    budget_bytes: int
    busy: int


class ConversationCache:
    def __init__(self, budget_bytes: int, idle_s: float) -> None:
        self.budget_bytes = int(budget_bytes)
        # TTLCache: the TTL runs from the last keep(), i.e. the last turn: an idle TTL.
        self._entries: TTLCache[Key, ConversationKV] = TTLCache(
            maxsize=max(1, self.budget_bytes), ttl=idle_s, getsizeof=lambda s: max(1, s.nbytes()))
        self._busy: set[Key] = set()
        self._lock = threading.Lock()

    def begin(self, key: Key) -> bool:
        """Mark a turn of ``key`` as running; False when one already is (the caller refuses)."""
        with self._lock:
            if key in self._busy:
                return False
            self._busy.add(key)
            return True

    def end(self, key: Key) -> None:
        with self._lock:
            self._busy.discard(key)

    def take(self, key: Key) -> ConversationKV | None:
        with self._lock:
            return self._entries.pop(key, None)

    def keep(self, key: Key, state: ConversationKV) -> None:
        if self.budget_bytes <= 0 or state.nbytes() > self.budget_bytes:
            return  # larger than the whole budget: the next turn rebuilds
        with self._lock:
            self._entries[key] = state

    def drop(self, user_id: str, conversation_id: str | None = None) -> int:
        """Forget a user's (or one conversation's) live KV; returns how many."""
        with self._lock:
            doomed = [k for k in list(self._entries.keys())
                      if k[0] == user_id and conversation_id in (None, k[1])]
            for key in doomed:
                self._entries.pop(key, None)
            return len(doomed)

    def stats(self) -> ConversationCacheStats:
        with self._lock:
            self._entries.expire()
            return ConversationCacheStats(len(self._entries), int(self._entries.currsize),
                                          self.budget_bytes, len(self._busy))
