"""The ObjectStore contract, run unchanged on every backend: the local directory, a real
S3 HTTP server and the in-memory store (see the `object_store` fixture in tests/plugins/s3.py)."""

import os
import threading

import pytest

from personalkv.ids import InvalidIdError
from personalkv.storage import ObjectNotFound


def test_round_trip(object_store):
    for key, data in [("a", b"x"), ("users/u/c/blob.kv", os.urandom(70_000)), ("e/empty", b"")]:
        object_store.put(key, data)
        assert object_store.get(key) == data
        assert object_store.exists(key)


def test_put_replaces(object_store):
    object_store.put("k/v", b"old")
    object_store.put("k/v", b"new-and-longer")
    assert object_store.get("k/v") == b"new-and-longer"
    assert list(object_store.list("")) == ["k/v"]


def test_missing_objects(object_store):
    assert not object_store.exists("no/such")
    with pytest.raises(ObjectNotFound, match="no/such"):
        object_store.get("no/such")
    with pytest.raises(KeyError):  # ObjectNotFound is also a KeyError
        object_store.get("no/such")


def test_delete_is_idempotent(object_store):
    object_store.put("d/x", b"1")
    object_store.delete("d/x")
    object_store.delete("d/x")
    object_store.delete("never/was")
    assert not object_store.exists("d/x")


def test_list_is_recursive_sorted_and_prefix_bounded(object_store):
    keys = ["u/a-b/1", "u/a/2", "u/a/sub/3", "u/ab/4", "v/5", "u0/6"]
    for key in reversed(keys):
        object_store.put(key, b".")
    assert list(object_store.list("u/a/")) == ["u/a/2", "u/a/sub/3"]
    assert list(object_store.list("u/")) == ["u/a-b/1", "u/a/2", "u/a/sub/3", "u/ab/4"]
    assert list(object_store.list("")) == sorted(keys)
    assert list(object_store.list("nothing/")) == []


def test_list_children_names_immediate_subprefixes(object_store):
    for key in ["users/bob/x", "users/alice/c/1", "users/alice/c/2", "users/file", "other/y"]:
        object_store.put(key, b".")
    assert list(object_store.list_children("users/")) == ["alice", "bob"]
    assert list(object_store.list_children("")) == ["other", "users"]
    assert list(object_store.list_children("users/alice/")) == ["c"]
    assert list(object_store.list_children("none/")) == []
    object_store.delete("users/bob/x")
    assert list(object_store.list_children("users/")) == ["alice"]


def test_delete_prefix(object_store):
    for key in ["p/1", "p/q/2", "pq/3", "r/4"]:
        object_store.put(key, b".")
    assert object_store.delete_prefix("p/") == 2
    assert list(object_store.list("")) == ["pq/3", "r/4"]
    assert object_store.delete_prefix("p/") == 0


BAD_KEYS = ["", "/abs", "a//b", "a/", "../x", "a/../b", "a/./b", ".hidden", "a/.tmp-x",
            "a\\b", "a b", "ключ", "a\x00b", "x" * 1025]  # fmt: skip


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_keys_are_refused_before_any_io(object_store, key):
    for operation in (
        lambda: object_store.put(key, b"x"),
        lambda: object_store.get(key),
        lambda: object_store.exists(key),
        lambda: object_store.delete(key),
    ):
        with pytest.raises(InvalidIdError):
            operation()
    assert list(object_store.list("")) == []


@pytest.mark.parametrize("prefix", ["a", "/", "../", "a//", "a/../"])
def test_bad_prefixes_are_refused(object_store, prefix):
    with pytest.raises(InvalidIdError):
        list(object_store.list(prefix))
    with pytest.raises(InvalidIdError):
        object_store.delete_prefix(prefix)


def test_delete_prefix_refuses_to_wipe_the_store(object_store):
    object_store.put("keep/me", b".")
    with pytest.raises(InvalidIdError, match="empty prefix"):
        object_store.delete_prefix("")
    assert object_store.exists("keep/me")


def test_concurrent_readers_never_see_a_torn_object(object_store):
    old, new = b"o" * 300_000, b"n" * 200_000
    object_store.put("m/obj", old)
    seen, stop = set(), threading.Event()

    def read():
        while not stop.is_set():
            seen.add(object_store.get("m/obj"))

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(10):
        object_store.put("m/obj", new if i % 2 == 0 else old)
    stop.set()
    reader.join()
    assert seen <= {old, new}


# -- compare-and-set ---------------------------------------------------------------------------
def test_put_if_is_compare_and_set(object_store):
    from personalkv.storage.base import PreconditionFailed

    object_store.put_if("m/x", b"v1", None)  # create-only
    with pytest.raises(PreconditionFailed):
        object_store.put_if("m/x", b"again", None)
    data, version = object_store.get_versioned("m/x")
    assert data == b"v1"
    object_store.put_if("m/x", b"v2", version)
    with pytest.raises(PreconditionFailed):  # a writer that read v1 cannot overwrite v2
        object_store.put_if("m/x", b"stale", version)
    assert object_store.get("m/x") == b"v2"
    with pytest.raises(ObjectNotFound):  # the object it read is gone
        object_store.put_if("m/none", b"x", version)
    assert list(object_store.list("")) == ["m/x"]  # no lock or temp file became a key


def test_concurrent_compare_and_set_loses_no_update(object_store):
    """12 threads x 5 read-increment-write cycles on one object: every increment lands."""
    from personalkv.storage.base import PreconditionFailed

    object_store.put("counter/n", b"0")
    start = threading.Barrier(12)

    def bump():
        start.wait()
        for _ in range(5):
            while True:
                data, version = object_store.get_versioned("counter/n")
                try:
                    object_store.put_if("counter/n", str(int(data) + 1).encode(), version)
                    break
                except PreconditionFailed:
                    continue

    threads = [threading.Thread(target=bump) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert object_store.get("counter/n") == b"60"


def test_an_s3_prefix_holds_every_object_with_the_local_stores_layout(
        s3_server, s3_bucket, local_object_store):
    """s3://bucket/prefix: every byte lands under prefix/ in the bucket, laid out exactly as
    the same writes lay out a local store (keys are the store's own, the prefix is added)."""
    prefixed = s3_server.open_store(s3_bucket, prefix="/team-a/pkv/")
    for store in (prefixed, local_object_store):
        store.put("users/ann/concepts/mug/manifest.json", b"{}")
        store.put("users/ann/concepts/mug/photos/p1.jpg", b"jpeg")
        store.put_if("users/bob/concepts/rex/manifest.json", b"{}", None)
        store.delete_prefix("users/ann/concepts/mug/photos/")
    expected = list(local_object_store.list())
    assert list(prefixed.list()) == expected == [
        "users/ann/concepts/mug/manifest.json", "users/bob/concepts/rex/manifest.json"]
    assert list(prefixed.list_children("users/")) == ["ann", "bob"]
    raw = s3_server.open_store(s3_bucket)  # the whole bucket, no prefix
    assert list(raw.list()) == [f"team-a/pkv/{key}" for key in expected]
    prefixed.close()
    raw.close()
