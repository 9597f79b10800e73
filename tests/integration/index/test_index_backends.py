"""The KeyIndex contract on both backends: embedded milvus-lite and the real Milvus server."""

from __future__ import annotations

import os

import numpy as np
import pytest

from personalkv.chunk_ref import ChunkRef
from personalkv.index import IndexEntry, SearchRequest, VectorSpace, open_key_index

SPACE = VectorSpace("contract", 16)


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(16).astype(np.float32)
    return v / np.linalg.norm(v)


def entries(user: str, concept: str, n: int, seed0: int = 0) -> list[IndexEntry]:
    return [IndexEntry(key_id=f"{user}.{concept}.{i}", user_id=user, concept_id=concept,
                       kind="image_patch", model_fingerprint="fp", vector=unit(seed0 + i),
                       source=str(i),
                       chunk=ChunkRef(chunk_id=f"{i:064x}", kind="image_patch",
                                      object_key=f"users/{user}/k{i}", token_count=i,
                                      position_span=2 * i, model_fingerprint="fp",
                                      source=str(i))) for i in range(n)]


def search(index, user, vector, **kw):
    return index.search(SearchRequest(SPACE, user, "fp", vector, **kw))


def test_fresh_writes_are_searchable_without_make_searchable(key_index):
    key_index.upsert(SPACE, entries("alice", "mug", 30))
    hits = search(key_index, "alice", unit(7), limit=5)
    assert hits[0].key_id == "alice.mug.7" and hits[0].score > 0.99
    chunk = hits[0].chunk
    assert (chunk.token_count, chunk.position_span, chunk.source) == (7, 14, "7")
    assert hits[0].source == "7" and chunk == entries("alice", "mug", 30)[7].chunk


def test_identical_vectors_of_two_users_stay_apart(key_index):
    key_index.upsert(SPACE, entries("alice", "mug", 10) + entries("bob", "mug", 10))
    for user in ("alice", "bob"):
        hits = search(key_index, user, unit(3), limit=20)
        assert len(hits) == 10 and {h.user_id for h in hits} == {user}
        assert all(h.chunk.object_key.startswith(f"users/{user}/") for h in hits)


def test_make_searchable_keeps_results(key_index):
    key_index.upsert(SPACE, entries("alice", "mug", 200) + entries("bob", "dog", 200, 1000))
    before = [h.key_id for h in search(key_index, "alice", unit(11), limit=10)]
    key_index.make_searchable()
    after = [h.key_id for h in search(key_index, "alice", unit(11), limit=10)]
    assert before[0] == after[0] == "alice.mug.11" and set(before) == set(after)
    assert key_index.count(SPACE) == 400


def test_deletes_are_visible_at_once_and_idempotent(key_index):
    key_index.upsert(SPACE, entries("alice", "mug", 5) + entries("alice", "dog", 5, 50)
                     + entries("bob", "mug", 5))
    for _ in range(2):
        key_index.delete_concept("alice", "mug")
        assert {h.concept_id for h in search(key_index, "alice", unit(1), limit=20)} == {"dog"}
    for _ in range(2):
        key_index.delete_user("alice")
        assert search(key_index, "alice", unit(51), limit=20) == []
        assert key_index.entries_of(SPACE, "alice", "fp") == []
    assert key_index.count(SPACE, "bob") == 5


def test_a_second_client_sees_a_delete_at_once(server_key_index):
    other = open_key_index(server_key_index.uri, prefix=server_key_index.prefix)
    try:
        server_key_index.upsert(SPACE, entries("alice", "mug", 5))
        assert other.count(SPACE, "alice") == 5
        server_key_index.delete_user("alice")
        assert search(other, "alice", unit(1)) == []
    finally:
        other.close()


def test_a_milvus_database_holds_the_collections_when_named(milvus_server):
    """IndexSettings.db_name reaches pymilvus: the collections live in that database, not in
    'default'; a database that does not exist is refused when the index is opened."""
    from pymilvus import MilvusClient

    from personalkv.index import IndexRequestError, IndexUnavailable, open_key_index

    admin = MilvusClient(uri=milvus_server)
    database = f"pkv_db_{os.getpid()}"
    if database not in admin.list_databases():
        admin.create_database(database)
    prefix = f"db{os.getpid()}"
    index = open_key_index(milvus_server, prefix=prefix, db_name=database)
    try:
        index.ensure_space(SPACE)
        in_db = MilvusClient(uri=milvus_server, db_name=database).list_collections()
        assert [c for c in in_db if c.startswith(prefix + "_")] == [index.collection(SPACE)]
        assert not [c for c in admin.list_collections() if c.startswith(prefix + "_")]
    finally:
        index.drop_all()
        index.close()
    with pytest.raises((IndexRequestError, IndexUnavailable), match="database"):
        open_key_index(milvus_server, prefix=prefix, db_name="no_such_db").ensure_space(SPACE)
