"""ChunkStore on both backends: layout, tenant isolation, manifest publication, deletion."""

import hashlib
import io
import threading

import pytest
from PIL import Image

from personalkv.chunk_ref import ChunkRef
from personalkv.ids import InvalidIdError
from personalkv.manifest import ConceptManifest, PatchRecord
from personalkv.storage import ChunkStore, MissingObjectsError, ObjectNotFound, StorageUnavailable
from personalkv.storage.chunk_store import InvalidPhotoError


def photo_bytes(fmt: str = "PNG", size=(32, 24), color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def chunk_id(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def build_concept(store: ChunkStore, user="alice", concept="rex", n_chunks=2) -> ConceptManifest:
    """What the pipeline does: blobs first, manifest last."""
    photo = store.put_photo(user, concept, photo_bytes())
    chunks = []
    for i in range(n_chunks):
        cid = chunk_id(f"{user}/{concept}/{i}")
        key = store.put_chunk(user, concept, cid, f"kv-{i}".encode() * 100)
        chunks.append(ChunkRef(chunk_id=cid, kind="image_patch", object_key=key,
                               token_count=8, position_span=8, model_fingerprint="fp",
                               source=str(i)))  # fmt: skip
    manifest = ConceptManifest(
        user_id=user, concept_id=concept, state="ready", profile={"name": concept},
        photos=[photo], chunks=chunks, model_fingerprint="fp",
        patches=[PatchRecord(photo_id=photo.photo_id, box=(0, 0, 8, 8), score=1.0)],
    )  # fmt: skip
    return store.write_manifest(manifest)


def test_layout_and_round_trip(chunk_store):
    manifest = build_concept(chunk_store)
    prefix = "users/alice/concepts/rex/"
    photo, chunk = manifest.photos[0], manifest.chunks[0]
    assert photo.object_key == f"{prefix}photos/{photo.photo_id}.png"
    assert chunk.object_key == f"{prefix}chunks/{chunk.chunk_id}.kv"
    assert (photo.width, photo.height, photo.media_type) == (32, 24, "image/png")
    assert sorted(chunk_store.objects.list(prefix)) == sorted(
        [f"{prefix}manifest.json", *manifest.object_keys()]
    )
    assert chunk_store.read_manifest("alice", "rex") == manifest
    assert chunk_store.get_photo("alice", "rex", photo.photo_id) == photo_bytes()
    assert chunk_store.get_chunk("alice", "rex", chunk.chunk_id) == b"kv-0" * 100
    assert chunk_store.get_chunk_by_key("alice", chunk.object_key) == b"kv-0" * 100
    assert chunk_store.has_chunk("alice", "rex", chunk.chunk_id)
    assert not chunk_store.has_chunk("alice", "rex", chunk_id("other"))


def test_photos_jpeg_and_media_type_checks(chunk_store):
    record = chunk_store.put_photo("alice", "rex", photo_bytes("JPEG"), "image/jpeg")
    assert record.object_key.endswith(".jpg") and record.media_type == "image/jpeg"
    assert chunk_store.get_photo("alice", "rex", record.photo_id) == photo_bytes("JPEG")
    with pytest.raises(InvalidPhotoError, match="image/png"):
        chunk_store.put_photo("alice", "rex", photo_bytes("PNG"), "image/jpeg")
    with pytest.raises(InvalidPhotoError, match="not a readable image"):
        chunk_store.put_photo("alice", "rex", b"#!/bin/sh\nrm -rf /")
    with pytest.raises(InvalidPhotoError, match="format"):
        chunk_store.put_photo("alice", "rex", photo_bytes("BMP"))
    with pytest.raises(ObjectNotFound):
        chunk_store.get_photo("alice", "rex", chunk_id("no photo"))


def test_identical_photos_of_two_users_never_share_an_id_or_object(chunk_store):
    data = photo_bytes()
    a = chunk_store.put_photo("alice", "mug", data)
    b = chunk_store.put_photo("bob", "mug", data)
    assert a.photo_id != b.photo_id and a.object_key != b.object_key
    assert a.object_key.startswith("users/alice/") and b.object_key.startswith("users/bob/")
    assert chunk_store.put_photo("alice", "mug", data) == a  # idempotent re-upload
    chunk_store.delete_user("bob")
    assert chunk_store.get_photo("alice", "mug", a.photo_id) == data


def test_a_user_cannot_read_another_users_chunk_by_key(chunk_store):
    bob = build_concept(chunk_store, user="bob")
    key = bob.chunks[0].object_key
    photo_as_alice = bob.photos[0].object_key.replace("bob", "alice")
    for bad in [key, key.replace("users/bob", "users/alice/../bob"), "users/alice/x",
                "users/alice/concepts/rex/manifest.json", photo_as_alice, None]:  # fmt: skip
        with pytest.raises(InvalidIdError):
            chunk_store.get_chunk_by_key("alice", bad)


def test_manifest_replace_is_atomic_and_last_writer_wins(chunk_store):
    manifest = build_concept(chunk_store)
    failed = manifest.model_copy(update={"state": "failed", "failure_reason": "re-mine"})
    stored = chunk_store.write_manifest(failed)
    assert stored.updated_at >= manifest.updated_at
    assert chunk_store.read_manifest("alice", "rex") == stored
    assert [k for k in chunk_store.objects.list("") if k.endswith("manifest.json")] == [
        "users/alice/concepts/rex/manifest.json"
    ]


def test_manifest_naming_unstored_objects_is_refused(chunk_store):
    manifest = build_concept(chunk_store)
    chunk_store.objects.delete(manifest.chunks[1].object_key)
    chunk_store.delete_concept("alice", "rex")
    for cid in (c.chunk_id for c in manifest.chunks[:1]):
        chunk_store.put_chunk("alice", "rex", cid, b"kv")
    chunk_store.put_photo("alice", "rex", photo_bytes())
    with pytest.raises(MissingObjectsError, match="write blobs before the manifest"):
        chunk_store.write_manifest(manifest)
    assert chunk_store.read_manifest("alice", "rex") is None
    assert chunk_store.list_concepts("alice") == []


def test_manifest_pointing_outside_its_concept_is_refused(chunk_store):
    manifest = build_concept(chunk_store, user="bob")
    stolen = manifest.model_copy(update={"user_id": "alice"})
    with pytest.raises(InvalidIdError, match="expected"):
        chunk_store.write_manifest(stolen)
    assert chunk_store.read_manifest("alice", "rex") is None


class FailingPuts:
    """Wraps an ObjectStore; puts of keys ending in `suffix` fail like a dead server."""

    def __init__(self, inner, suffix):
        self.inner, self.suffix = inner, suffix

    def put(self, key, data, content_type="application/octet-stream"):
        if key.endswith(self.suffix):
            raise StorageUnavailable("injected: S3 endpoint is unreachable")
        self.inner.put(key, data, content_type)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_failed_manifest_write_keeps_the_previous_manifest(chunk_store):
    first = build_concept(chunk_store)
    flaky = ChunkStore(FailingPuts(chunk_store.objects, "manifest.json"))
    with pytest.raises(StorageUnavailable):
        flaky.write_manifest(first.model_copy(update={"state": "caching"}))
    assert chunk_store.read_manifest("alice", "rex") == first
    with pytest.raises(StorageUnavailable):
        build_concept(flaky, concept="new")
    assert chunk_store.read_manifest("alice", "new") is None
    assert chunk_store.list_concepts("alice") == ["rex"]


def test_listing_users_and_concepts(chunk_store):
    assert chunk_store.list_users() == [] and chunk_store.list_concepts("alice") == []
    build_concept(chunk_store, "alice", "rex")
    build_concept(chunk_store, "alice", "mug")
    build_concept(chunk_store, "bob", "car")
    chunk_store.put_chunk("alice", "in-progress", chunk_id("x"), b"kv")  # no manifest yet
    assert chunk_store.list_users() == ["alice", "bob"]
    assert chunk_store.list_concepts("alice") == ["mug", "rex"]
    assert chunk_store.list_concepts("bob") == ["car"]
    assert chunk_store.list_concepts("carol") == []


def test_delete_concept_removes_everything_and_is_idempotent(chunk_store):
    build_concept(chunk_store, "alice", "rex")
    keep = build_concept(chunk_store, "alice", "mug")
    assert chunk_store.delete_concept("alice", "rex") == 3  # photo + 2 chunks; manifest apart
    assert chunk_store.delete_concept("alice", "rex") == 0
    assert chunk_store.read_manifest("alice", "rex") is None
    assert list(chunk_store.objects.list("users/alice/concepts/rex/")) == []
    assert chunk_store.list_concepts("alice") == ["mug"]
    assert chunk_store.read_manifest("alice", "mug") == keep


def test_delete_retried_after_a_crash_half_way(chunk_store):
    manifest = build_concept(chunk_store, n_chunks=3)
    # Crash after the manifest and one blob went: the concept is already invisible...
    chunk_store.objects.delete(chunk_store.manifest_key("alice", "rex"))
    chunk_store.objects.delete(manifest.chunks[0].object_key)
    assert chunk_store.list_concepts("alice") == []
    # ...and the retry removes what is left.
    assert chunk_store.delete_concept("alice", "rex") == 3
    assert list(chunk_store.objects.list("")) == []


def test_delete_user_forgets_everything_of_that_user_only(chunk_store):
    build_concept(chunk_store, "alice", "rex")
    build_concept(chunk_store, "alice", "mug")
    chunk_store.put_chunk("alice", "in-progress", chunk_id("x"), b"kv")
    bob = build_concept(chunk_store, "bob", "rex")
    assert chunk_store.delete_user("alice") == 7  # 2 x (photo + 2 chunks) + 1 chunk
    assert chunk_store.delete_user("alice") == 0
    assert list(chunk_store.objects.list("users/alice/")) == []
    assert chunk_store.list_users() == ["bob"]
    assert chunk_store.read_manifest("bob", "rex") == bob


BAD_IDS = ["", "../bob", "bob/x", "Bob", "bоb", "a" * 65, ".", "-x"]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_every_method_refuses_bad_ids(chunk_store, bad):
    cid = chunk_id("c")
    calls = [
        lambda: chunk_store.put_photo(bad, "rex", photo_bytes()),
        lambda: chunk_store.put_photo("alice", bad, photo_bytes()),
        lambda: chunk_store.get_photo(bad, "rex", cid),
        lambda: chunk_store.put_chunk(bad, "rex", cid, b"kv"),
        lambda: chunk_store.put_chunk("alice", bad, cid, b"kv"),
        lambda: chunk_store.put_chunk("alice", "rex", bad, b"kv"),
        lambda: chunk_store.get_chunk("alice", bad, cid),
        lambda: chunk_store.has_chunk(bad, "rex", cid),
        lambda: chunk_store.get_chunk_by_key(bad, f"users/{bad}/concepts/rex/chunks/{cid}.kv"),
        lambda: chunk_store.read_manifest(bad, "rex"),
        lambda: chunk_store.read_manifest("alice", bad),
        lambda: chunk_store.list_concepts(bad),
        lambda: chunk_store.delete_concept("alice", bad),
        lambda: chunk_store.delete_user(bad),
    ]
    for call in calls:
        with pytest.raises(InvalidIdError):
            call()
    assert list(chunk_store.objects.list("")) == []


def test_identical_chunks_of_two_users_live_in_separate_objects(chunk_store):
    # Chunk ids come from personalkv.kv (they hash the owner in); even if two users' ids were
    # equal, the user prefix keeps the objects apart.
    cid = chunk_id("same content")
    key_a = chunk_store.put_chunk("alice", "rex", cid, b"kv-alice")
    key_b = chunk_store.put_chunk("bob", "rex", cid, b"kv-bob")
    assert key_a != key_b
    chunk_store.delete_user("alice")
    assert chunk_store.get_chunk("bob", "rex", cid) == b"kv-bob"
    assert not chunk_store.has_chunk("alice", "rex", cid)


def test_readers_see_whole_manifests_while_it_is_rewritten(chunk_store):
    manifest = build_concept(chunk_store, n_chunks=20)
    states, errors, stop = set(), [], threading.Event()

    def read():
        while not stop.is_set():
            try:
                states.add(chunk_store.read_manifest("alice", "rex").state)
            except Exception as exc:  # a torn manifest would fail to parse
                errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    for state in ["caching", "ready"] * 5:
        chunk_store.write_manifest(manifest.model_copy(update={"state": state}))
    stop.set()
    reader.join()
    assert not errors and states <= {"caching", "ready"}
