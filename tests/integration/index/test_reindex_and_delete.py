"""Reindex from manifests answers like the index it replaced; deleting a concept or a user
leaves no entry and no retrieval behind. Both index backends, both object stores."""

from __future__ import annotations

import pytest

from personalkv.retrieval.indexing import index_concept, reindex
from personalkv.config import RetrievalSettings
from personalkv.retrieval.encoders import get_image_encoder, get_text_encoder
from personalkv.retrieval.keys import KeyBuilder
from personalkv.retrieval.retriever import Retriever
from tests.plugins.milvus import FINGERPRINT, build_concept, scene, write_concept

CONCEPTS = [
    ("bobo", "Bobo", "my golden retriever with a red collar", 1),
    ("mug", "Blue mug", "my favourite coffee mug", 2),
    ("speedy", "Speedy", "my road bike with a carbon frame", 3),
]
QUESTIONS = [("What colour is Bobo's collar?", None), ("is my cup clean?", None),
             ("what is this?", 2), ("Speedy or Bobo?", 3), ("weather tomorrow?", None)]


@pytest.fixture
def keys():
    return KeyBuilder(get_text_encoder("minilm"), get_image_encoder("global"))


@pytest.fixture
def store(local_object_store):
    from personalkv.storage.chunk_store import ChunkStore

    return ChunkStore(local_object_store)


def _world(chunk_store, key_index, keys):
    """alice and bob own the same three concepts (same photos, same texts), indexed one by one
    as the ingest path does; alice has a fourth concept that is not ready yet."""
    for user in ("alice", "bob"):
        for cid, name, info, look in CONCEPTS:
            manifest = write_concept(chunk_store, user, cid, name, info, look)
            index_concept(key_index, keys, manifest,
                          lambda pid, u=user, c=cid: chunk_store.get_photo(u, c, pid))
    pending, _ = build_concept("alice", "kettle", "Kettle", "the kettle", 5, n_photos=0)
    chunk_store.write_manifest(pending.model_copy(update={"state": "mining", "chunks": []}))
    return chunk_store, key_index, keys


@pytest.fixture
def world(store, key_index, keys):
    return _world(store, key_index, keys)


@pytest.fixture
def s3_world(s3_object_store, lite_key_index, keys):  # manifests and photos from the S3 server
    from personalkv.storage.chunk_store import ChunkStore

    return _world(ChunkStore(s3_object_store), lite_key_index, keys)


def answers(retriever, user="alice"):
    out = []
    for question, look in QUESTIONS:
        photo = scene(look, 77)[0] if look else None
        result = retriever.retrieve(user, question, photo, top_k=3, model_fingerprint=FINGERPRINT)
        out.append([(c.concept_id, round(c.score, 3), tuple(ch.chunk_id for ch in c.chunks))
                    for c in result.concepts])
    return out


def test_reindex_gives_the_same_results(world):
    _check_reindex(*world)


def test_reindex_from_the_s3_server_gives_the_same_results(s3_world):
    _check_reindex(*s3_world)


def _check_reindex(store, index, keys):
    retriever = Retriever(index, keys, RetrievalSettings())
    before = {u: answers(retriever, u) for u in ("alice", "bob")}
    counts = (index.count(keys.text_space), index.count(keys.image_space))
    lines = []
    report = reindex(store, index, keys, progress=lines.append)
    assert {u: answers(retriever, u) for u in ("alice", "bob")} == before
    assert (index.count(keys.text_space), index.count(keys.image_space)) == counts
    assert (report.users, report.concepts, report.skipped) == (2, 6, 1)
    assert lines and "reindex done" in lines[-1]
    assert any(before["alice"])  # the questions do find things


def test_reindex_of_one_user_leaves_the_others(world):
    store, index, keys = world
    before = index.count(keys.text_space, "bob")
    index.delete_user("bob")
    reindex(store, index, keys, users=["bob"], progress=lambda _: None)
    assert index.count(keys.text_space, "bob") == before
    assert index.count(keys.text_space, "alice") == 6


def test_delete_concept_then_user_leaves_nothing(world):
    store, index, keys = world
    retriever = Retriever(index, keys, RetrievalSettings())
    for _ in range(2):  # idempotent, safe to retry
        store.delete_concept("alice", "bobo")
        index.delete_concept("alice", "bobo")
        found = retriever.retrieve("alice", "Where is Bobo?", scene(1, 5)[0],
                                   model_fingerprint=FINGERPRINT)
        assert "bobo" not in {c.concept_id for c in found.candidates}
    assert [c.concept_id for c in retriever.retrieve(
        "bob", "Where is Bobo?", model_fingerprint=FINGERPRINT).concepts] == ["bobo"]
    for _ in range(2):
        store.delete_user("alice")
        index.delete_user("alice")
        assert index.count(keys.text_space, "alice") == index.count(keys.image_space, "alice") == 0
        for question, look in QUESTIONS:
            result = retriever.retrieve("alice", question, scene(look or 1, 9)[0],
                                        model_fingerprint=FINGERPRINT)
            assert result.none_matched and not result.candidates
    # and a reindex does not bring alice back: the manifests are the truth
    reindex(store, index, keys, progress=lambda _: None)
    assert index.count(keys.text_space, "alice") == 0 and index.count(keys.text_space, "bob") == 6
