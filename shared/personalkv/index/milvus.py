"""``KeyIndex`` on Milvus through pymilvus ``MilvusClient`` - one client code for all deployments.

* a file path (``./var/index.db``) opens milvus-lite, embedded in this process. One process only
  may open the file. Use it up to ~20,000 keys (about 200 users x 100 keys): measured on this
  2-core machine (benchmarks/storage_index.py, filtered search, dim 384, after
  ``make_searchable``) p50 11-37 ms / p99 24-77 ms at 20k keys (quiet vs. busy machine), but
  p50 61-73 ms / p99 88-320 ms at 50k and p50 ~100 ms / p99 ~530 ms at 100k; unflushed rows
  cost ~0.6 s per search at 20k. Beyond 20k keys, or with more than one process, give way to
  a server.
* ``http://host:port`` opens a Milvus server: the local stack, the integration tests, the
  benchmarks (``personalkv.devstack.milvus``) and a production cluster. At 1M keys (10,000
  users x 100) a 2.3.5 standalone server answers filtered searches in p50 2-4 ms, p99 8-25 ms,
  right after insertion and after indexing alike, in ~2.5 GB of memory (top-1 recall 0.875
  on unindexed growing data, 0.99+ once indexed).

One collection per ``VectorSpace``; ``user_id`` is the partition key, so a user's search touches
one partition, and every search and query filters by user and model fingerprint.

Freshness: the collection uses "Session" consistency, so searches never pay the up-to-one-time-
tick (200 ms) wait of "Strong". pymilvus implements "Session" with the last write timestamp *of
its own process*: the writer reads its own writes, but another process (the answering server
after a Celery worker wrote) searches "Eventually" and may miss a write for up to a time tick.
So writers confirm before they tell anyone: ``wait_visible`` after an insert, and deletes inside
``delete_*``, run a "Strong" query (the server waits until its query nodes have consumed every
write before it); once it sees the new state, every later search of any client sees it too.

``make_searchable`` flushes (seals growing segments, which triggers the index build), waits for
the build and loads: without it a fresh milvus-lite collection is brute-force scanned (~0.9 s per
search at 20k keys vs ~13 ms).

Errors: every public method translates pymilvus and gRPC errors into ``IndexUnavailable``
(the server is down, overloaded or timed out: retry) or ``IndexRequestError`` (Milvus refused
the request itself: retrying cannot help), so no caller handles pymilvus' exception types and
a permanent error (bad schema, wrong dimension) is never retried for minutes as an outage.
"""

from __future__ import annotations

import functools
import re
import threading
import time
from typing import Sequence

import numpy as np

from personalkv.chunk_ref import ChunkRef
from personalkv.index.base import (
    IndexEntry, IndexRequestError, IndexUnavailable, KeyIndex, SearchHit, SearchRequest,
    VectorSpace, poll_until_visible,
)

#: A key's chunk (``IndexEntry.chunk``, a ``ChunkRef``) is stored in flat columns (chunk_id,
#: object_key, token_count, the span; kind, fingerprint and source are the key's own), mapped
#: in ``_chunk_columns`` / ``_chunk`` only. The span's column keeps its original name
#: ``position_extent`` (``ChunkRef.position_span``): existing collections load without a reindex.
_SPAN_COLUMN = "position_extent"
_FIELDS = ("key_id", "user_id", "concept_id", "kind", "model_fingerprint", "chunk_id",
           "object_key", "token_count", _SPAN_COLUMN, "source")
_BATCH = 2000  # rows per insert RPC: well under the 64 MB gRPC message limit at dim 1024


# gRPC codes that mean "not now" rather than "never": pymilvus' retry decorator gives up with a
# MilvusException whose code is the last RpcError's StatusCode.
_TRANSIENT_GRPC = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED"})
_CONNECT_FAILED = 2  # pymilvus.client.types.Status.CONNECT_FAILED: no channel / cannot connect
_RATE_LIMIT = 8  # pymilvus.exceptions.ErrorCode.RATE_LIMIT: the server sheds load


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) means the index is unavailable now.
    Unknown errors are permanent: retrying them would only hide the cause."""
    import grpc
    from pymilvus.exceptions import (
        ConnectError, ConnectionNotExistException, MilvusException, MilvusUnavailableException,
    )

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (IndexUnavailable, MilvusUnavailableException, ConnectError,
                                ConnectionNotExistException, ConnectionError, TimeoutError,
                                grpc.FutureTimeoutError)):
            return True
        if isinstance(current, grpc.RpcError) and callable(getattr(current, "code", None)) \
                and getattr(current.code(), "name", "") in _TRANSIENT_GRPC:
            return True
        if isinstance(current, MilvusException):
            code = current.code
            if isinstance(code, grpc.StatusCode):
                return code.name in _TRANSIENT_GRPC
            if code in (_CONNECT_FAILED, _RATE_LIMIT):
                return True
        current = current.__cause__ or current.__context__
    return False


def _translated(method):
    """Run ``method``; re-raise client errors as ``IndexUnavailable`` / ``IndexRequestError``.
    The index's own errors (``KeysNotVisible``, ``ValueError`` of bad input) pass unchanged."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (IndexUnavailable, IndexRequestError, ValueError):
            raise
        except Exception as exc:
            what = f"Milvus {method.__name__} on {self.uri_for_errors}"
            if is_transient(exc):
                raise IndexUnavailable(f"{what}: {type(exc).__name__}: {exc}") from exc
            raise IndexRequestError(f"{what}: {type(exc).__name__}: {exc}") from exc

    return wrapper


def _quote(value: str) -> str:
    # Ids are validated upstream (personalkv.ids); quoting here is defence in depth so a stray
    # quote can never widen a filter to another user.
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class MilvusKeyIndex(KeyIndex):
    """See module docstring. ``prefix`` namespaces collections (tests use one per test); no
    prefix may be another's prefix plus "_" (``drop_all`` drops by name prefix)."""

    def __init__(self, uri: str, prefix: str = "pkv", token: str = "", hnsw_m: int = 16,
                 ef_construction: int = 100, ef_search: int = 64, num_partitions: int = 64,
                 request_timeout_s: float = 10.0, db_name: str = "", ca_file: str = "",
                 tls_server_name: str = ""):
        """``db_name``, ``ca_file`` and ``tls_server_name``: a server's database and TLS
        (``IndexSettings``); TLS is on with a CA file or an https:// uri (system roots)."""
        from pymilvus import MilvusClient

        self.uri = uri
        # Deadline of the calls on a request path (search, delete): a hung Milvus costs an Ask
        # or a DeleteConcept this long, then UNAVAILABLE, not the RPC's whole deadline.
        self.request_timeout_s = request_timeout_s
        self.is_lite = not uri.startswith(("http://", "https://", "tcp://", "grpc://"))
        # Errors name the deployment kind, not the endpoint: messages may reach clients.
        self.uri_for_errors = "milvus-lite" if self.is_lite else "the Milvus server"
        options: dict = {}
        if self.is_lite:
            # pymilvus pings every 10 s even when idle; milvus-lite's gRPC server allows far
            # fewer pings and answers GOAWAY "too_many_pings" (an ERROR line on stderr). The
            # connection is a local socket: no keepalive needed.
            options["grpc_options"] = {"grpc.keepalive_time_ms": 2**31 - 1,
                                       "grpc.keepalive_permit_without_calls": 0}
        else:
            options["db_name"] = db_name
            if ca_file:
                options.update(secure=True, server_pem_path=ca_file)
            if tls_server_name:
                options["server_name"] = tls_server_name
        try:
            self.client = MilvusClient(uri=uri, token=token, **options)
        except Exception as exc:
            error = IndexUnavailable if is_transient(exc) else IndexRequestError
            raise error(f"cannot open {self.uri_for_errors}: {type(exc).__name__}: {exc}") from exc
        self.prefix = prefix
        self.hnsw = {"M": hnsw_m, "efConstruction": ef_construction}
        self.ef_search = ef_search
        self.num_partitions = num_partitions
        self._known: set[str] = set()
        self._load_lock = threading.Lock()

    # -- collections -------------------------------------------------------------------------
    def collection(self, space: VectorSpace) -> str:
        return re.sub(r"[^0-9a-zA-Z_]", "_", f"{self.prefix}_{space.name}_{space.dim}")

    def _owned(self) -> list[str]:
        return [c for c in self.client.list_collections() if c.startswith(self.prefix + "_")]

    def _ready(self, name: str) -> bool:
        """Whether collection ``name`` exists; loads it on first use in this process (a reopened
        milvus-lite file, or a server restarted, starts with its collections released)."""
        if name in self._known:
            return True
        # One thread loads; the others wait for it. Unlocked, concurrent first searches of a
        # fresh process saw the state 'Loading', took the collection as ready and failed with
        # "in state 'released'" (5 INTERNAL Asks in the serving benchmark's overload phase).
        with self._load_lock:
            if name in self._known:
                return True
            if not self.client.has_collection(name):
                return False
            if "Loaded" not in str(self.client.get_load_state(name).get("state")):
                self.client.load_collection(name)  # blocks until loaded
            self._known.add(name)
        return True

    @_translated
    def ensure_space(self, space: VectorSpace) -> None:
        from pymilvus import DataType, MilvusClient

        name = self.collection(space)
        if self._ready(name):
            return
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("key_id", DataType.VARCHAR, is_primary=True, max_length=64)
        schema.add_field("user_id", DataType.VARCHAR, max_length=128, is_partition_key=True)
        schema.add_field("concept_id", DataType.VARCHAR, max_length=128)
        schema.add_field("kind", DataType.VARCHAR, max_length=32)
        schema.add_field("model_fingerprint", DataType.VARCHAR, max_length=128)
        schema.add_field("chunk_id", DataType.VARCHAR, max_length=128)
        schema.add_field("object_key", DataType.VARCHAR, max_length=1024)
        schema.add_field("token_count", DataType.INT64)
        schema.add_field(_SPAN_COLUMN, DataType.INT64)
        schema.add_field("source", DataType.VARCHAR, max_length=512)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=space.dim)
        index = self.client.prepare_index_params()
        index.add_index(field_name="vector", index_type="HNSW", metric_type="IP", params=self.hnsw)
        if self.is_lite:
            # milvus-lite lacks the AllocTimestamp RPC with which pymilvus waits for an index
            # build: create_collection(index_params=...) logs two ERROR tracebacks there (the
            # build itself is immediate). So: the collection, its index without the wait, load.
            self.client.create_collection(name, schema=schema, consistency_level="Session")
            self.client.create_index(name, index, sync=False)
            self.client.load_collection(name)
        else:
            self.client.create_collection(name, schema=schema, index_params=index, consistency_level="Session",
                                          num_partitions=self.num_partitions)
        self._known.add(name)

    # -- writes ------------------------------------------------------------------------------
    @_translated
    def upsert(self, space: VectorSpace, entries: Sequence[IndexEntry]) -> None:
        # Delete by primary key, then insert - what Milvus' own upsert does. Its upsert RPC is
        # not used: Milvus 2.3.5 acknowledges pymilvus 3's upsert into a partition-key collection
        # and the rows never become visible (measured; even to Strong reads).
        self.ensure_space(space)
        name = self.collection(space)
        for start in range(0, len(entries), _BATCH):
            batch = entries[start:start + _BATCH]
            self.client.delete(name, ids=[e.key_id for e in batch])
            self.client.insert(name, [_row(e, space.dim) for e in batch])
        if self.is_lite and entries:
            # milvus-lite scans unflushed rows slowly (+100 ms per search with only a few
            # fresh rows, measured), so an incremental write is flushed at once; a server
            # searches growing segments through an interim index and seals them itself.
            self.client.flush(name)

    @_translated
    def insert(self, space: VectorSpace, entries: Sequence[IndexEntry]) -> None:
        # Bulk load (reindex, benchmark): no delete pass before the insert.
        self.ensure_space(space)
        name = self.collection(space)
        for start in range(0, len(entries), _BATCH):
            self.client.insert(name, [_row(e, space.dim) for e in entries[start:start + _BATCH]])

    @_translated
    def make_searchable(self, space: VectorSpace | None = None, timeout_s: float = 3600) -> None:
        names = [self.collection(space)] if space else self._owned()
        for name in names:
            self.client.flush(name)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                info = self.client.describe_index(name, "vector")
                if int(info.get("pending_index_rows", 0)) == 0 and \
                        int(info.get("indexed_rows", 0)) >= int(info.get("total_rows", 0)):
                    break
                time.sleep(0.5)
            # A load after the build makes the query nodes swap growing/temp segments for the
            # indexed sealed ones; a no-op when already loaded with everything.
            self.client.load_collection(name)

    @_translated
    def delete_concept(self, user_id: str, concept_id: str) -> None:
        self._delete(f"user_id == {_quote(user_id)} and concept_id == {_quote(concept_id)}")

    @_translated
    def delete_user(self, user_id: str) -> None:
        self._delete(f"user_id == {_quote(user_id)}")

    def _delete(self, expr: str) -> None:
        for name in self._owned():
            self._ready(name)
            self.client.delete(name, filter=expr, timeout=self.request_timeout_s)
            # Confirm with a Strong read: once it sees nothing, every later search of any
            # client is past the delete's timestamp. Retrying covers lagging tombstones.
            for _ in range(50):
                if not self.client.query(name, filter=expr, output_fields=["key_id"], limit=1,
                                         consistency_level="Strong",
                                         timeout=self.request_timeout_s):
                    break
                self.client.delete(name, filter=expr, timeout=self.request_timeout_s)
                time.sleep(0.1)
            else:
                raise IndexUnavailable(f"delete not yet visible in {name}; retry")

    @_translated
    def wait_visible(self, user_id: str, key_ids: Sequence[str], timeout_s: float = 30.0,
                     poll_s: float = 0.1) -> None:
        def seen_now(pending: set[str]) -> set[str]:
            seen: set[str] = set()
            for name in [n for n in self._owned() if self._ready(n)]:
                # one Strong read per collection: each has its own channels
                todo = sorted(pending - seen)
                for start in range(0, len(todo), _BATCH):
                    batch = todo[start:start + _BATCH]
                    expr = (f"user_id == {_quote(user_id)} and "
                            f"key_id in [{', '.join(_quote(k) for k in batch)}]")
                    rows = self.client.query(name, filter=expr, output_fields=["key_id"],
                                             limit=len(batch), consistency_level="Strong")
                    seen.update(r["key_id"] for r in rows)
            return seen

        poll_until_visible(user_id, key_ids, seen_now, timeout_s, poll_s,
                           hint="; the index server may be overloaded or the write was lost - "
                                "retry the write")

    @_translated
    def drop_all(self) -> None:
        for name in self._owned():
            self.client.drop_collection(name)
        self._known.clear()

    # -- reads -------------------------------------------------------------------------------
    def _scope(self, user_id: str, fingerprint: str, concept_ids: Sequence[str] | None,
               kinds: Sequence[str] | None = None) -> str:
        expr = f"user_id == {_quote(user_id)} and model_fingerprint == {_quote(fingerprint)}"
        if concept_ids is not None:
            expr += f" and concept_id in [{', '.join(_quote(c) for c in concept_ids)}]"
        if kinds is not None:
            expr += f" and kind in [{', '.join(_quote(k) for k in kinds)}]"
        return expr

    @_translated
    def search(self, request: SearchRequest) -> list[SearchHit]:
        name = self.collection(request.space)
        if not self._ready(name):
            return []
        vectors = np.asarray(request.vector, dtype=np.float32).reshape(-1, request.space.dim)
        result = self.client.search(
            name, data=vectors.tolist(), limit=request.limit, output_fields=list(_FIELDS),
            filter=self._scope(request.user_id, request.model_fingerprint, request.concept_ids),
            search_params={"metric_type": "IP", "params": {"ef": max(self.ef_search, request.limit)}},
            timeout=self.request_timeout_s,
        )
        best: dict[str, SearchHit] = {}
        for per_query in result:
            for h in per_query:
                hit = _hit(h["entity"], float(h["distance"]))
                if hit.key_id not in best or hit.score > best[hit.key_id].score:
                    best[hit.key_id] = hit
        return sorted(best.values(), key=lambda h: -h.score)[: request.limit]

    @_translated
    def entries_of(self, space: VectorSpace, user_id: str, model_fingerprint: str,
                   concept_ids: Sequence[str] | None = None,
                   kinds: Sequence[str] | None = None) -> list[SearchHit]:
        name = self.collection(space)
        if concept_ids is not None and not concept_ids or not self._ready(name):
            return []
        expr = self._scope(user_id, model_fingerprint, concept_ids, kinds)
        rows = self.client.query(name, filter=expr, output_fields=list(_FIELDS), limit=16384)
        return [_hit(r, 0.0) for r in rows]

    @_translated
    def count(self, space: VectorSpace, user_id: str | None = None) -> int:
        name = self.collection(space)
        if not self._ready(name):
            return 0
        expr = f"user_id == {_quote(user_id)}" if user_id else 'key_id != ""'
        rows = self.client.query(name, filter=expr, output_fields=["count(*)"],
                                 consistency_level="Strong")
        return int(rows[0]["count(*)"]) if rows else 0

    def close(self) -> None:
        self.client.close()


def _row(e: IndexEntry, dim: int) -> dict:
    vector = np.asarray(e.vector, dtype=np.float32).reshape(-1)
    if vector.shape[0] != dim:
        raise ValueError(f"entry {e.key_id}: vector dim {vector.shape[0]} != space dim {dim}")
    return {
        "key_id": e.key_id, "user_id": e.user_id, "concept_id": e.concept_id, "kind": e.kind,
        "model_fingerprint": e.model_fingerprint, **_chunk_columns(e.chunk),
        "source": e.source[:512], "vector": vector.tolist(),
    }


def _hit(row: dict, score: float) -> SearchHit:
    return SearchHit(
        key_id=row["key_id"], user_id=row["user_id"], concept_id=row["concept_id"],
        kind=row["kind"], score=score, model_fingerprint=row.get("model_fingerprint", ""),
        source=row.get("source", ""), chunk=_chunk(row),
    )


# A key's ChunkRef <-> its row: the only two places that know the chunk columns.
def _chunk_columns(chunk: ChunkRef | None) -> dict:
    """The chunk columns of a key (kind, fingerprint and source are the key's own columns,
    equal to the chunk's: ``IndexEntry`` checks it); a chunkless key has ``chunk_id == ""``."""
    if chunk is None:
        return {"chunk_id": "", "object_key": "", "token_count": 0, _SPAN_COLUMN: 0}
    return {"chunk_id": chunk.chunk_id, "object_key": chunk.object_key,
            "token_count": int(chunk.token_count), _SPAN_COLUMN: int(chunk.position_span)}


def _chunk(row: dict) -> ChunkRef | None:
    """The chunk a stored key leads to (its chunk columns plus the key's kind, fingerprint and
    source); None for a chunkless key."""
    if not row.get("chunk_id"):
        return None
    return ChunkRef(
        chunk_id=row["chunk_id"], kind=row["kind"], object_key=row.get("object_key", ""),
        token_count=int(row.get("token_count", 0)), position_span=int(row.get(_SPAN_COLUMN, 0)),
        model_fingerprint=row.get("model_fingerprint", ""), source=row.get("source", ""),
    )
