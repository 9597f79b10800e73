"""``ObjectStore`` in this process's memory: a dict of bytes behind one lock.

An in-memory ``ObjectStore`` for fast tests, beside the local directory (the reference) and
S3; the contract suite (tests/integration/storage/test_object_store_contract.py) runs it with
both, so the three behave alike. Opened as ``memory://`` (every ``open_object_store("memory://")``
is a new, empty store). Nothing survives the process and nothing is shared with another
process: for tests and single-process experiments only.

Every method holds the lock for its whole body, so ``put`` is atomic and ``put_if`` is a true
compare-and-set; a version is a counter, bumped on every write, so a key that was deleted and
written again never gets an old version back.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator

from personalkv.storage.base import (
    ObjectNotFound, ObjectStore, check_key, check_prefix, check_version,
)


class InMemoryObjectStore(ObjectStore):
    """See module docstring."""

    def __init__(self, url: str = "memory://"):
        self.url = url
        self._lock = threading.Lock()
        self._objects: dict[str, tuple[bytes, str]] = {}  # key -> (bytes, version)
        self._versions = itertools.count(1)

    def _store(self, key: str, data: bytes) -> None:  # caller holds the lock
        self._objects[key] = (bytes(data), str(next(self._versions)))

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        check_key(key)
        with self._lock:
            self._store(key, data)

    def get(self, key: str) -> bytes:
        return self.get_versioned(key)[0]

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        check_key(key)
        with self._lock:
            try:
                return self._objects[key]
            except KeyError:
                raise ObjectNotFound(f"no object {key!r} in {self.url}") from None

    def put_if(self, key: str, data: bytes, version: str | None,
               content_type: str = "application/octet-stream") -> None:
        check_key(key)
        with self._lock:
            current = self._objects.get(key)
            check_version(key, None if current is None else current[1], version, self.url)
            self._store(key, data)

    def exists(self, key: str) -> bool:
        check_key(key)
        with self._lock:
            return key in self._objects

    def delete(self, key: str) -> None:
        check_key(key)
        with self._lock:
            self._objects.pop(key, None)

    def _keys(self, prefix: str) -> list[str]:
        """The sorted keys under ``prefix``, a snapshot taken under the lock."""
        check_prefix(prefix)
        with self._lock:
            return sorted(key for key in self._objects if key.startswith(prefix))

    def list(self, prefix: str = "") -> Iterator[str]:
        yield from self._keys(prefix)

    def list_children(self, prefix: str = "") -> Iterator[str]:
        children = {key[len(prefix):].split("/", 1)[0]
                    for key in self._keys(prefix) if "/" in key[len(prefix):]}
        yield from sorted(children)
