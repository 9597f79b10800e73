"""The S3 server goes away in the middle of publishing a concept: the manifest write fails
fast with StorageUnavailable, and once the server is back no partial concept is visible.

A small TCP proxy stands between the store and the session's S3 server, so the "outage" can
be switched off and on while the server keeps its data.
"""

import hashlib
import time

import pytest
from personalkv.chunk_ref import ChunkRef
from personalkv.manifest import ConceptManifest
from personalkv.storage import ChunkStore, StorageUnavailable
from personalkv.storage.s3 import S3ObjectStore

from tests.support.tcp_proxy import CuttableProxy


@pytest.fixture
def proxied_store(s3_server, s3_bucket):
    proxy = CuttableProxy(s3_server.port)
    objects = S3ObjectStore(
        s3_bucket, f"127.0.0.1:{proxy.port}", s3_server.access_key, s3_server.secret_key, retries=1
    )
    store = ChunkStore(objects)
    yield proxy, store
    proxy.cut()


def test_outage_during_publish_leaves_no_manifest(proxied_store):
    proxy, store = proxied_store
    cid = hashlib.sha256(b"chunk").hexdigest()
    key = store.put_chunk("alice", "rex", cid, b"kv" * 1000)
    manifest = ConceptManifest(
        user_id="alice", concept_id="rex", state="ready", profile={"name": "Rex"},
        chunks=[ChunkRef(chunk_id=cid, kind="profile_text", object_key=key, token_count=4,
                         position_span=4, model_fingerprint="fp", source="profile")],
    )  # fmt: skip

    proxy.cut()
    start = time.monotonic()
    with pytest.raises(StorageUnavailable, match=f"127.0.0.1:{proxy.port}"):
        store.write_manifest(manifest)
    assert time.monotonic() - start < 5.0

    proxy.restore()
    assert store.read_manifest("alice", "rex") is None
    assert store.list_concepts("alice") == []
    assert store.write_manifest(manifest).chunks == manifest.chunks  # the retry publishes it
    assert store.list_concepts("alice") == ["rex"]
