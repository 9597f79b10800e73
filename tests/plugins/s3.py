"""S3 server and object store fixtures (owned by the storage work).

  s3_server          session: one real S3 HTTP server -> S3Endpoint (a `minio` binary on PATH,
                     else moto; PERSONALKV_TEST_S3_KIND=moto|minio forces one)
  s3_bucket          a fresh, unique bucket name per test (created on first use)
  s3_object_store    an S3ObjectStore on that bucket
  s3_prefixed_object_store  an S3ObjectStore under a key prefix of that bucket, beside a
                     sibling prefix holding objects of its own (which it must never see)
  local_object_store a LocalObjectStore in tmp_path
  memory_object_store an InMemoryObjectStore
  object_store       parametrized over BACKENDS: the same test runs on each; the S3 server
                     is only started when an "s3" case actually runs
  chunk_store        a ChunkStore over `object_store`
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest

from personalkv.devstack.s3 import S3Endpoint, S3Server

BACKENDS = ["local", "s3", "s3_prefixed", "memory"]
_bucket_numbers = itertools.count()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Endpoint]:
    server = S3Server(os.environ.get("PERSONALKV_TEST_S3_KIND", "auto"))  # type: ignore[arg-type]
    endpoint = server.start()
    yield endpoint
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Endpoint) -> str:
    # A bucket per test: no test sees another's objects, and no cleanup pass is needed.
    return f"test-{os.getpid()}-{next(_bucket_numbers)}"


@pytest.fixture
def s3_object_store(s3_server: S3Endpoint, s3_bucket: str):
    store = s3_server.open_store(s3_bucket)
    yield store
    store.close()


@pytest.fixture
def s3_prefixed_object_store(s3_server: S3Endpoint, s3_bucket: str):
    sibling = s3_server.open_store(s3_bucket, prefix="tenant-b")
    sibling.put("users/zed/concepts/c/manifest.json", b"{}")
    store = s3_server.open_store(s3_bucket, prefix="tenant-a/pkv")
    yield store
    # nothing the store did reached outside its prefix
    assert list(sibling.list()) == ["users/zed/concepts/c/manifest.json"]
    store.close()
    sibling.close()


@pytest.fixture
def local_object_store(tmp_path):
    from personalkv.storage.local import LocalObjectStore

    return LocalObjectStore(tmp_path / "objects")


@pytest.fixture
def memory_object_store():
    from personalkv.storage.memory import InMemoryObjectStore

    return InMemoryObjectStore()


@pytest.fixture(params=BACKENDS)
def object_store(request):
    return request.getfixturevalue(f"{request.param}_object_store")


@pytest.fixture
def chunk_store(object_store):
    from personalkv.storage.chunk_store import ChunkStore

    return ChunkStore(object_store)
