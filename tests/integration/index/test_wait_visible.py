"""``KeyIndex.wait_visible``: once it returns, readers in *other* processes see the new keys.

Why it exists: pymilvus implements the collections' "Session" consistency with the last write
timestamp of its own process, so the answering server (which never writes) searches
"Eventually" and, right after a Celery worker inserted keys, may not see them for up to one
time tick. The caching pipeline calls ``index_concept`` -> ``wait_visible`` before it publishes
a concept as ready. Here the other process is played by a second ``MilvusClient`` that reads
with consistency "Eventually" - exactly what another process's default read sends (guarantee
timestamp 1); a second client with the default level would share this process's session
timestamp and prove nothing.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from personalkv.index import IndexEntry, KeysNotVisible, VectorSpace
from personalkv.retrieval.indexing import index_concept

TEXT, IMAGE = VectorSpace("vis_text", 8), VectorSpace("vis_image", 16)


def entries(space: VectorSpace, user: str, concept: str, n: int, seed: int) -> list[IndexEntry]:
    vectors = np.random.default_rng(seed).standard_normal((n, space.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return [IndexEntry(key_id=f"{user}.{concept}.{space.name}.{i}", user_id=user,
                       concept_id=concept, kind="image_patch", model_fingerprint="fp",
                       vector=vectors[i]) for i in range(n)]


def test_wait_visible_makes_fresh_keys_visible_to_another_process(server_key_index,
                                                                  milvus_server):
    from pymilvus import MilvusClient

    index = server_key_index
    other = MilvusClient(uri=milvus_server)  # the answering server's connection
    try:
        for round_ in range(8):  # a fresh user each round: nothing of theirs was ever read
            user = f"visuser{round_}"
            text, image = entries(TEXT, user, "c", 2, round_), entries(IMAGE, user, "c", 6, round_)
            index.upsert(TEXT, text)
            index.upsert(IMAGE, image)
            index.wait_visible(user, [e.key_id for e in text + image], timeout_s=30)
            for space, written in ((TEXT, text), (IMAGE, image)):
                name = index.collection(space)
                flt = f'user_id == "{user}" and model_fingerprint == "fp"'
                hits = other.search(name, data=[written[0].vector.tolist()], limit=20,
                                    filter=flt, output_fields=["key_id"],
                                    consistency_level="Eventually")[0]
                rows = other.query(name, filter=flt, output_fields=["key_id"],
                                   consistency_level="Eventually")
                expected = {e.key_id for e in written}
                assert {h["entity"]["key_id"] for h in hits} == expected, (round_, space)
                assert {r["key_id"] for r in rows} == expected, (round_, space)
    finally:
        other.close()


def test_wait_visible_times_out_with_a_clear_error(key_index):
    key_index.upsert(IMAGE, entries(IMAGE, "alice", "mug", 3, 0))
    present = "alice.mug.vis_image.0"
    started = time.monotonic()
    with pytest.raises(KeysNotVisible) as caught:
        key_index.wait_visible("alice", [present, "never-written-1", "never-written-2"],
                               timeout_s=0.5)
    assert time.monotonic() - started >= 0.5
    assert isinstance(caught.value, TimeoutError)  # the service layer retries TimeoutErrors
    message = str(caught.value)
    assert "2 of 3" in message and "'alice'" in message and "never-written-1" in message
    # Another user's key with the same id never counts as visible for this user.
    with pytest.raises(KeysNotVisible):
        key_index.wait_visible("bob", [present], timeout_s=0.2)
    key_index.wait_visible("alice", [present], timeout_s=5)  # and present keys pass at once
    key_index.wait_visible("alice", [], timeout_s=0)


def test_index_concept_waits_for_every_key_it_wrote(lite_key_index, local_object_store):
    from personalkv.retrieval.encoders import get_image_encoder, get_text_encoder
    from personalkv.retrieval.keys import KeyBuilder
    from personalkv.storage.chunk_store import ChunkStore
    from tests.plugins.milvus import write_concept

    store = ChunkStore(local_object_store)
    keys = KeyBuilder(get_text_encoder("minilm"), get_image_encoder("global"))
    manifest = write_concept(store, "alice", "bobo", "Bobo", "my golden retriever", 1)
    calls = []
    original = lite_key_index.wait_visible
    lite_key_index.wait_visible = lambda user, ids, timeout_s=30.0: (
        calls.append((user, list(ids), timeout_s)), original(user, ids, timeout_s))
    built = index_concept(lite_key_index, keys, manifest,
                          lambda pid: store.get_photo("alice", "bobo", pid), visible_timeout_s=7)
    assert len(calls) == 1
    user, ids, timeout_s = calls[0]
    assert (user, timeout_s) == ("alice", 7)
    assert sorted(ids) == sorted(e.key_id for e in built.text + built.image) and built.image
