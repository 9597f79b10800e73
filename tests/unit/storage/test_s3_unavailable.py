"""S3 down: every operation fails fast with StorageUnavailable naming the endpoint, and a
failed manifest write leaves no manifest behind."""

import socket
import threading
import time

import pytest

from personalkv.manifest import ConceptManifest
from personalkv.storage import ChunkStore, StorageUnavailable
from personalkv.storage.s3 import S3ObjectStore

FAST = 5.0  # seconds: the bound a caller (Celery task, gRPC deadline) can rely on


@pytest.fixture
def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens here once the socket is closed


@pytest.fixture
def silent_port():
    """A server that accepts TCP connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted, stop = [], threading.Event()

    def accept():
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


def down_store(port: int, **kwargs) -> S3ObjectStore:
    return S3ObjectStore("bucket", f"127.0.0.1:{port}", "ak", "sk-secret", **kwargs)


OPERATIONS = {
    "put": lambda s: s.put("a/b", b"x"),
    "get": lambda s: s.get("a/b"),
    "exists": lambda s: s.exists("a/b"),
    "delete": lambda s: s.delete("a/b"),
    "list": lambda s: list(s.list("a/")),
    "list_children": lambda s: list(s.list_children("")),
    "delete_prefix": lambda s: s.delete_prefix("a/"),
}


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_closed_port_fails_fast_with_a_clear_error(closed_port, operation):
    store = down_store(closed_port)
    start = time.monotonic()
    with pytest.raises(StorageUnavailable) as excinfo:
        OPERATIONS[operation](store)
    assert time.monotonic() - start < FAST
    assert f"127.0.0.1:{closed_port}" in str(excinfo.value)
    assert "unreachable" in str(excinfo.value)


def test_a_server_that_never_answers_times_out(silent_port):
    store = down_store(silent_port, read_timeout_s=0.3, retries=1)
    start = time.monotonic()
    with pytest.raises(StorageUnavailable, match="unreachable"):
        store.get("a/b")
    assert time.monotonic() - start < FAST


def test_failed_manifest_write_raises_and_publishes_nothing(closed_port):
    chunks = ChunkStore(down_store(closed_port))
    manifest = ConceptManifest(user_id="alice", concept_id="rex", profile={"name": "Rex"})
    start = time.monotonic()
    with pytest.raises(StorageUnavailable):
        chunks.write_manifest(manifest)
    with pytest.raises(StorageUnavailable):
        chunks.read_manifest("alice", "rex")  # down is down, not "no such concept"
    assert time.monotonic() - start < 2 * FAST
