"""The retrieval-key index: what the retriever searches to find a user's concepts.

Who calls what, and when:

* ``personalkv.retrieval.indexing`` and the concept-ingest path call ``ensure_space`` once per
  vector space, then ``upsert`` with the entries ``personalkv.retrieval.keys`` built from a
  concept manifest, then ``wait_visible`` with their key ids before reporting the concept as
  ready: a user may Ask (in another process, with another connection) right after.
* ``personalkv.retrieval.Retriever`` calls ``search`` (one per modality per question) and
  ``entries_of`` for the chunks of the concepts it picked. Both always carry the user id and
  the model fingerprint: no code path can search across users.
* The delete path calls ``delete_concept`` / ``delete_user``: idempotent, safe to retry, and
  visible to every later ``search`` of any client once they return.

An index is derived data: ``reindex`` rebuilds it from the manifests alone, so a backend may be
dropped and rebuilt at any time. Backends are opened by URI in ``personalkv.index.open_key_index``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from tenacity import RetryError, Retrying, retry_if_result, stop_after_delay, wait_fixed

from personalkv.chunk_ref import ChunkRef


@dataclass(frozen=True)
class VectorSpace:
    """One embedding space = one collection: text keys and image keys have different encoders and
    dimensions. ``name`` includes the encoder, so changing encoder never mixes vectors."""

    name: str
    dim: int


@dataclass(frozen=True)
class IndexEntry:
    """One retrieval key. ``key_id`` is the primary key: a hash of (user, concept, fingerprint,
    kind, source), never the bare chunk id, because chunk ids are content hashes and two users
    with identical photos or texts must never share (and overwrite) an entry.

    ``chunk`` is the KV chunk this key leads to (the manifest's ``ChunkRef``, passed through);
    None for a key without a chunk (a name key, a whole-photo key). A key's ``kind``,
    ``model_fingerprint`` and ``source`` are its chunk's when it has one (checked here): a
    backend stores them once and reads the chunk back from the key's columns (Milvus keeps the
    flat columns, ``index.milvus._row`` / ``_hit``).
    """

    key_id: str
    user_id: str
    concept_id: str
    kind: str  # "profile_text" | "image_patch" | "name" | "photo"
    model_fingerprint: str
    vector: np.ndarray
    source: str = ""
    chunk: ChunkRef | None = None

    def __post_init__(self) -> None:
        c = self.chunk
        if c is not None and (c.kind, c.model_fingerprint, c.source) != \
                (self.kind, self.model_fingerprint, self.source):
            raise ValueError(
                f"entry {self.key_id}: kind/model_fingerprint/source "
                f"{(self.kind, self.model_fingerprint, self.source)} differ from its chunk's "
                f"{(c.kind, c.model_fingerprint, c.source)}")


@dataclass(frozen=True)
class SearchHit:
    """One search result; ``score`` is cosine similarity (vectors are L2-normalised).
    ``chunk`` as in ``IndexEntry``: the KV chunk the key leads to, None for chunkless keys."""

    key_id: str
    user_id: str
    concept_id: str
    kind: str
    score: float
    model_fingerprint: str = ""
    source: str = ""
    chunk: ChunkRef | None = None


@dataclass(frozen=True)
class SearchRequest:
    """One parameter object for ``KeyIndex.search`` so variants evolve without breaking callers.

    ``vector`` may be one query (dim,) or several (n, dim), e.g. crops of one photo: a key's
    score is then its best cosine over the queries."""

    space: VectorSpace
    user_id: str
    model_fingerprint: str
    vector: np.ndarray
    limit: int = 20
    concept_ids: Sequence[str] | None = None


class IndexUnavailable(Exception):
    """The index cannot answer now (server down, overloaded, timed out): safe to retry later.
    Backends translate their client's errors into this or ``IndexRequestError`` themselves, so
    callers never need to know the client library's exception types."""


class IndexRequestError(Exception):
    """The index refused the request itself (bad schema, wrong dimension, bad filter): retrying
    the same request cannot help, so the service layer reports it instead of retrying."""


class KeysNotVisible(IndexUnavailable, TimeoutError):
    """``KeyIndex.wait_visible`` timed out: written keys are not visible to every reader yet.
    Transient (``IndexUnavailable``): the service layer retries."""


def poll_until_visible(user_id: str, key_ids: Sequence[str], seen_now: Callable[[set[str]], set[str]],
                       timeout_s: float, poll_s: float, hint: str = "") -> None:
    """The polling loop of every ``KeyIndex.wait_visible``: ``seen_now(pending)`` returns the
    subset of ``pending`` key ids of ``user_id`` that a reader sees now. Returns once every key
    was seen; raises ``KeysNotVisible`` (with ``hint`` appended) after ``timeout_s``."""
    wanted = set(key_ids)
    seen: set[str] = set()
    if not wanted:
        return

    def missing() -> set[str]:
        seen.update(seen_now(wanted - seen))
        return wanted - seen

    try:
        Retrying(retry=retry_if_result(bool), stop=stop_after_delay(timeout_s),
                 wait=wait_fixed(poll_s))(missing)
    except RetryError as gave_up:
        still = gave_up.last_attempt.result()
        raise KeysNotVisible(
            f"{len(still)} of {len(wanted)} index keys of user {user_id!r} not visible to "
            f"search after {timeout_s:g}s (e.g. {sorted(still)[:3]}){hint}") from None


@dataclass
class IndexStats:
    entries: int = 0
    spaces: dict[str, int] = field(default_factory=dict)


class KeyIndex(ABC):
    """A per-user, per-model-fingerprint vector index of retrieval keys (see module docstring)."""

    @abstractmethod
    def ensure_space(self, space: VectorSpace) -> None:
        """Create the collection for ``space`` if missing (idempotent)."""

    @abstractmethod
    def upsert(self, space: VectorSpace, entries: Sequence[IndexEntry]) -> None:
        """Insert or replace entries by ``key_id``."""

    def insert(self, space: VectorSpace, entries: Sequence[IndexEntry]) -> None:
        """Bulk load of keys known to be new (``reindex``): a backend may skip the replace pass
        that ``upsert`` pays. Same result as ``upsert`` for new keys."""
        self.upsert(space, entries)

    @abstractmethod
    def make_searchable(self, space: VectorSpace | None = None) -> None:
        """Make everything written so far visible to ``search`` at full speed (flush, build the
        index, load). Call after a bulk write; single upserts are already visible."""

    @abstractmethod
    def wait_visible(self, user_id: str, key_ids: Sequence[str], timeout_s: float = 30.0) -> None:
        """Return once every later ``search``/``entries_of`` of *any* client (another process,
        another connection) sees all of ``key_ids`` of ``user_id``. A write is only sure to be
        visible to the writing client; call this before telling anyone the keys exist. Raises
        ``KeysNotVisible`` (a ``TimeoutError``: the caller retries) after ``timeout_s``."""

    @abstractmethod
    def search(self, request: SearchRequest) -> list[SearchHit]:
        """Nearest keys of one user and fingerprint, best first."""

    @abstractmethod
    def entries_of(
        self, space: VectorSpace, user_id: str, model_fingerprint: str,
        concept_ids: Sequence[str] | None = None, kinds: Sequence[str] | None = None,
    ) -> list[SearchHit]:
        """Entries of one user and fingerprint (score 0), optionally only of some concepts and
        kinds: the chunks to place, the concept names to look for in a question."""

    @abstractmethod
    def delete_concept(self, user_id: str, concept_id: str) -> None:
        """Remove every entry of one concept in every space. Idempotent."""

    @abstractmethod
    def delete_user(self, user_id: str) -> None:
        """Remove every entry of one user in every space. Idempotent."""

    @abstractmethod
    def drop_all(self) -> None:
        """Drop every collection this index owns (before a full ``reindex``)."""

    @abstractmethod
    def count(self, space: VectorSpace, user_id: str | None = None) -> int:
        """Number of entries (of one user), for tests and progress output."""

    def close(self) -> None:
        """Release the connection (milvus-lite: the file lock)."""
