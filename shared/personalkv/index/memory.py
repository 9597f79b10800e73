"""``KeyIndex`` in this process's memory: exact inner-product search over numpy arrays.

The reference implementation of the ``KeyIndex`` contract (as ``LocalObjectStore`` is for
objects): the unit tests run the use cases on it, and the contract suite runs it beside
milvus-lite and the Milvus server so the three cannot drift apart. Opened as ``memory://``
(every ``open_key_index("memory://")`` is a new, empty index). Nothing survives the process and
nothing is shared with another process, so it is for tests and single-process experiments only.

Search is brute force (one matrix product per space and user), exact where Milvus' HNSW is
approximate; writes are visible to every reader at once, so ``wait_visible`` only checks.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Sequence

import numpy as np

from personalkv.index.base import (
    IndexEntry, KeyIndex, SearchHit, SearchRequest, VectorSpace, poll_until_visible,
)


class InMemoryKeyIndex(KeyIndex):
    """See module docstring. ``uri`` and ``options`` are accepted for ``open_key_index``."""

    def __init__(self, uri: str = "memory://", **options):
        self.uri = uri
        self._lock = threading.Lock()
        # (space name, dim) -> key_id -> entry: one "collection" per space, as in Milvus.
        self._spaces: dict[tuple[str, int], dict[str, IndexEntry]] = {}

    # -- writes ------------------------------------------------------------------------------
    def ensure_space(self, space: VectorSpace) -> None:
        with self._lock:
            self._spaces.setdefault((space.name, space.dim), {})

    def upsert(self, space: VectorSpace, entries: Sequence[IndexEntry]) -> None:
        rows = [_checked(e, space.dim) for e in entries]
        with self._lock:
            collection = self._spaces.setdefault((space.name, space.dim), {})
            for row in rows:
                collection[row.key_id] = row

    def make_searchable(self, space: VectorSpace | None = None) -> None:
        """Nothing to build: every write is searchable at once."""

    def wait_visible(self, user_id: str, key_ids: Sequence[str], timeout_s: float = 30.0,
                     poll_s: float = 0.05) -> None:
        def seen_now(pending: set[str]) -> set[str]:
            with self._lock:
                return {k for c in self._spaces.values() for k, e in c.items()
                        if k in pending and e.user_id == user_id}

        poll_until_visible(user_id, key_ids, seen_now, timeout_s, poll_s)

    def delete_concept(self, user_id: str, concept_id: str) -> None:
        self._delete(lambda e: e.user_id == user_id and e.concept_id == concept_id)

    def delete_user(self, user_id: str) -> None:
        self._delete(lambda e: e.user_id == user_id)

    def _delete(self, matches) -> None:
        with self._lock:
            for collection in self._spaces.values():
                for key in [k for k, e in collection.items() if matches(e)]:
                    del collection[key]

    def drop_all(self) -> None:
        with self._lock:
            self._spaces.clear()

    # -- reads -------------------------------------------------------------------------------
    def _scoped(self, space: VectorSpace, user_id: str, fingerprint: str,
                concept_ids: Sequence[str] | None, kinds: Sequence[str] | None = None,
                ) -> list[IndexEntry]:
        with self._lock:
            rows = list(self._spaces.get((space.name, space.dim), {}).values())
        return [e for e in rows if e.user_id == user_id and e.model_fingerprint == fingerprint
                and (concept_ids is None or e.concept_id in concept_ids)
                and (kinds is None or e.kind in kinds)]

    def search(self, request: SearchRequest) -> list[SearchHit]:
        rows = self._scoped(request.space, request.user_id, request.model_fingerprint,
                            request.concept_ids)
        if not rows:
            return []
        queries = np.asarray(request.vector, dtype=np.float32).reshape(-1, request.space.dim)
        keys = np.stack([np.asarray(e.vector, dtype=np.float32) for e in rows])
        scores = (queries @ keys.T).max(axis=0)  # a key's score is its best over the queries
        order = np.argsort(-scores, kind="stable")[: request.limit]
        return [_hit(rows[i], float(scores[i])) for i in order]

    def entries_of(self, space: VectorSpace, user_id: str, model_fingerprint: str,
                   concept_ids: Sequence[str] | None = None,
                   kinds: Sequence[str] | None = None) -> list[SearchHit]:
        return [_hit(e, 0.0) for e in self._scoped(space, user_id, model_fingerprint,
                                                     concept_ids, kinds)]

    def count(self, space: VectorSpace, user_id: str | None = None) -> int:
        with self._lock:
            rows = self._spaces.get((space.name, space.dim), {}).values()
            return sum(1 for e in rows if user_id is None or e.user_id == user_id)


def _checked(e: IndexEntry, dim: int) -> IndexEntry:
    vector = np.asarray(e.vector, dtype=np.float32).reshape(-1)
    if vector.shape[0] != dim:
        raise ValueError(f"entry {e.key_id}: vector dim {vector.shape[0]} != space dim {dim}")
    # Milvus keeps at most 512 characters of ``source`` (its chunk's too, read back from that
    # column); the reference index does the same.
    source, chunk = e.source[:512], e.chunk
    if chunk is not None and chunk.source != source:
        chunk = chunk.model_copy(update={"source": source})
    return replace(e, vector=vector.copy(), source=source, chunk=chunk)


def _hit(e: IndexEntry, score: float) -> SearchHit:
    # ``chunk`` is an immutable ChunkRef: the entry's own is handed out.
    return SearchHit(
        key_id=e.key_id, user_id=e.user_id, concept_id=e.concept_id, kind=e.kind, score=score,
        model_fingerprint=e.model_fingerprint, source=e.source, chunk=e.chunk,
    )
