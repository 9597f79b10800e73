"""LocalObjectStore specifics: keys never escape the root, writes are atomic, no litter.

The behaviour it shares with S3 is tested once for both in
tests/integration/storage/test_object_store_contract.py.
"""

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from personalkv.ids import InvalidIdError
from personalkv.storage.base import StorageError
from personalkv.storage.local import LocalObjectStore


@pytest.fixture
def store(tmp_path):
    return LocalObjectStore(tmp_path / "root")


def test_keys_map_to_files_under_the_root(store):
    store.put("users/a/x.kv", b"1")
    assert (store.root / "users" / "a" / "x.kv").read_bytes() == b"1"
    assert store.url == store.root.as_uri()


def test_a_symlink_inside_the_root_cannot_lead_outside(store, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (store.root / "users").mkdir()
    os.symlink(outside, store.root / "users" / "evil")
    with pytest.raises(InvalidIdError, match="outside"):
        store.put("users/evil/x.kv", b"1")
    with pytest.raises(InvalidIdError, match="outside"):
        store.get("users/evil/x.kv")
    assert list(outside.iterdir()) == []


def test_failed_write_keeps_old_bytes_and_leaves_no_temp_file(store, monkeypatch):
    store.put("m/manifest.json", b"old")

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        store.put("m/manifest.json", b"new")
    monkeypatch.undo()
    assert store.get("m/manifest.json") == b"old"
    assert os.listdir(store.root / "m") == ["manifest.json"]


def test_temp_files_of_a_crashed_writer_are_not_listed(store):
    store.put("a/b.kv", b"1")
    (store.root / "a" / ".tmp-b.kv.123").write_bytes(b"half")
    assert list(store.list("")) == ["a/b.kv"]


def test_deletes_prune_empty_directories(store):
    store.put("users/a/concepts/c/chunks/x.kv", b"1")
    store.put("users/a/keep.kv", b"1")
    store.delete("users/a/concepts/c/chunks/x.kv")
    assert not (store.root / "users" / "a" / "concepts").exists()
    assert (store.root / "users" / "a").is_dir()
    assert store.root.is_dir()


def test_key_and_directory_collision_is_a_storage_error(store):
    store.put("a/b", b"file")
    with pytest.raises(StorageError, match="collides"):
        store.put("a/b/c", b"x")


def test_opening_creates_the_root(tmp_path):
    LocalObjectStore(tmp_path / "x" / "y")
    assert (tmp_path / "x" / "y").is_dir()


@given(key=st.text(alphabet=st.sampled_from(list("ab./\\-_ \x00é%~")), max_size=12))
@settings(max_examples=300, deadline=None)
def test_no_key_reaches_outside_the_root(tmp_path_factory, key):
    root = tmp_path_factory.mktemp("fuzz")
    store = LocalObjectStore(root / "root")
    try:
        store.put(key, b"x")
    except (InvalidIdError, StorageError):
        pass
    written = [p for p in root.rglob("*") if p.is_file()]
    assert all(p.is_relative_to(store.root) for p in written)


def test_symlinks_to_outside_files_or_dirs_are_never_followed(store, tmp_path):
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "passwd").write_bytes(b"root:x")
    (store.root / "users" / "a").mkdir(parents=True)
    os.symlink(secret / "passwd", store.root / "users" / "a" / "x.kv")
    os.symlink(secret, store.root / "users" / "b")
    with pytest.raises(InvalidIdError, match="outside"):
        store.get("users/a/x.kv")
    with pytest.raises(InvalidIdError, match="outside"):
        list(store.list("users/b/"))
    with pytest.raises(InvalidIdError, match="outside"):
        store.delete_prefix("users/b/")
    assert list(store.list("")) == []  # links are not objects
    store.delete("users/a/x.kv")  # removes the link, not its target
    assert (secret / "passwd").read_bytes() == b"root:x"
    assert not (store.root / "users" / "a" / "x.kv").is_symlink()
