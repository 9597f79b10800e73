"""Photo recognition slots shared fairly between users.

An answering process runs at most ``service.photo_recognitions`` photo recognitions at once
(they are CPU-heavy: windows, descriptors), so that photo Asks queue among themselves and never
take the CPU from text Asks. One user may hold all but one of them (at least one): another
user's photo Ask always finds a slot within one recognition, whatever the first sends.
"""

from __future__ import annotations

import collections
import threading
import time


class FairSlots:
    """``total`` slots, at most ``per_user`` of them (``total - 1``, at least 1) held by one
    user. ``acquire`` waits (up to ``timeout``) for a slot the caller's user may take."""

    def __init__(self, total: int):
        self.total = total
        self.per_user = max(1, total - 1)
        self._cond = threading.Condition()
        self._in_use = 0
        self._by_user: collections.Counter[str] = collections.Counter()

    def _free_for(self, user_id: str) -> bool:
        return self._in_use < self.total and self._by_user[user_id] < self.per_user

    def acquire(self, user_id: str = "", blocking: bool = True, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._free_for(user_id):
                if not blocking:
                    return False
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            self._in_use += 1
            self._by_user[user_id] += 1
            return True

    def release(self, user_id: str = "") -> None:
        with self._cond:
            if self._by_user[user_id] <= 0:
                raise ValueError(f"release of a photo slot {user_id!r} does not hold")
            self._in_use -= 1
            self._by_user[user_id] -= 1
            if not self._by_user[user_id]:
                del self._by_user[user_id]
            self._cond.notify_all()
