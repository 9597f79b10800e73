"""devstack.s3: a real S3 server subprocess that starts, serves the factory's URL, and stops."""

import socket

import pytest

from personalkv.devstack.s3 import S3Server
from personalkv.storage import StorageUnavailable, open_object_store
from personalkv.storage.s3 import S3ObjectStore


def test_factory_url_and_settings_reach_the_session_server(s3_server, s3_bucket):
    settings = s3_server.settings(s3_bucket)
    store = open_object_store(settings=settings)
    assert isinstance(store, S3ObjectStore) and store.bucket == s3_bucket
    store.put("users/a/x", b"hello")
    assert s3_server.open_store(s3_bucket).get("users/a/x") == b"hello"
    assert s3_server.store_url(s3_bucket).startswith(f"s3://{s3_bucket}?endpoint=127.0.0.1:")


def test_server_starts_and_stops_cleanly():
    server = S3Server()
    endpoint = server.start()
    assert server.start() is endpoint  # idempotent
    store = endpoint.open_store("bucket-a", retries=0)
    store.put("k", b"v")
    proc = server._proc
    server.stop()
    assert proc.poll() is not None and server.endpoint is None
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", endpoint.port)) != 0
    with pytest.raises(StorageUnavailable, match=str(endpoint.port)):
        store.get("k")
    server.stop()  # idempotent


def test_a_taken_port_is_reported():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        server = S3Server("moto", port=s.getsockname()[1], startup_timeout_s=10)
        with pytest.raises(RuntimeError, match="did not start"):
            server.start()


def test_chunk_store_opens_from_settings(s3_server, s3_bucket):
    from personalkv.storage import ChunkStore

    store = ChunkStore.open(settings=s3_server.settings(s3_bucket))
    assert store.list_users() == [] and store.objects.bucket == s3_bucket
