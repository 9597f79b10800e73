"""open_object_store: backend by URL scheme, lazy imports, clear errors."""

import subprocess
import sys

import pytest

from personalkv.config import StorageSettings
from personalkv.storage import open_object_store
from personalkv.storage.local import LocalObjectStore
from personalkv.storage.s3 import S3ObjectStore


def test_file_urls_and_plain_paths_open_a_local_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for url, root in [
        (f"file://{tmp_path}/a", tmp_path / "a"),
        (str(tmp_path / "b"), tmp_path / "b"),
        ("file://./c/d", tmp_path / "c" / "d"),
        ("rel/e", tmp_path / "rel" / "e"),
        (f"file://localhost{tmp_path}/f", tmp_path / "f"),
    ]:
        store = open_object_store(url)
        assert isinstance(store, LocalObjectStore) and store.root == root.resolve()


def test_default_url_comes_from_settings(tmp_path):
    store = open_object_store(settings=StorageSettings(url=str(tmp_path / "s")))
    assert isinstance(store, LocalObjectStore) and store.root == tmp_path / "s"


def test_settings_read_the_environment(monkeypatch):
    monkeypatch.setenv("PERSONALKV_STORAGE_URL", "s3://b?endpoint=h:1")
    monkeypatch.setenv("PERSONALKV_STORAGE_SECRET_KEY", "s3cret")
    settings = StorageSettings()
    assert settings.url == "s3://b?endpoint=h:1"
    assert "s3cret" not in repr(settings)
    assert settings.secret_key.get_secret_value() == "s3cret"


def test_s3_url_builds_a_store_without_touching_the_network():
    settings = StorageSettings(access_key="ak", secret_key="sk", region="eu-west-1")
    store = open_object_store("s3://my-bucket?endpoint=127.0.0.1:1&secure=false", settings)
    assert isinstance(store, S3ObjectStore)
    assert (store.bucket, store.endpoint) == ("my-bucket", "127.0.0.1:1")
    assert "sk" not in store.url
    assert store.root == ""
    prefixed = open_object_store("s3://my-bucket/team-a/pkv/?endpoint=127.0.0.1:1", settings)
    assert (prefixed.bucket, prefixed.root) == ("my-bucket", "team-a/pkv/")
    assert prefixed.url.startswith("s3://my-bucket/team-a/pkv?endpoint=")


def test_memory_url_opens_a_new_empty_store_each_time():
    from personalkv.storage.memory import InMemoryObjectStore

    first = open_object_store("memory://")
    first.put("a/b", b"x")
    second = open_object_store("memory://")
    assert isinstance(second, InMemoryObjectStore) and list(second.list("")) == []
    assert first.get("a/b") == b"x"
    with pytest.raises(ValueError, match="memory://"):
        open_object_store("memory://shared")


@pytest.mark.parametrize(
    "url,message",
    [
        ("redis://host/0", "known: file://, s3://"),
        ("s3://bucket", "endpoint"),
        ("s3://bucket/../x?endpoint=h:1", "invalid segment"),
        ("s3://bucket?endpoint=h:1&secret=x", "unknown parameter"),
        ("s3://bucket?endpoint=h:1&secure=maybe", "boolean"),
        ("s3://Bad_Bucket?endpoint=h:1", "bucket name"),
        ("file://otherhost/x", "host"),
        ("file:///x?y=1", "query"),
    ],
)
def test_bad_urls_fail_with_a_clear_message(url, message):
    with pytest.raises(ValueError, match=message):
        open_object_store(url, StorageSettings())


def test_local_backend_does_not_import_minio(tmp_path):
    code = (
        "import sys; from personalkv.storage import open_object_store; "
        f"open_object_store({str(tmp_path)!r}); assert 'minio' not in sys.modules, 'minio loaded'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
