"""ConceptManifest: JSON round trip, id validation, consistency checks."""

import hashlib
import json

import pytest
from pydantic import ValidationError

from personalkv.chunk_ref import ChunkRef
from personalkv.manifest import (
    MANIFEST_FORMAT_VERSION,
    ConceptManifest,
    ConceptProfile,
    PatchRecord,
    PhotoRecord,
)

PHOTO = hashlib.sha256(b"photo").hexdigest()
CHUNK = hashlib.sha256(b"chunk").hexdigest()


def make_manifest(**overrides) -> ConceptManifest:
    fields = dict(
        user_id="alice",
        concept_id="rex",
        state="ready",
        profile=ConceptProfile(
            name="Rex", category="dog", info="my corgi, loves socks", caption="a corgi",
            attributes=["ears: pointy", "tail: short"], source="vlm",
        ),
        photos=[PhotoRecord(photo_id=PHOTO, object_key="k/p.png", media_type="image/png",
                            width=640, height=480, bytes=1234)],
        patches=[PatchRecord(photo_id=PHOTO, box=(1, 2, 30, 40), score=0.9,
                             scores={"clip": 0.8, "saliency": 1.0})],
        chunks=[ChunkRef(chunk_id=CHUNK, kind="image_patch", object_key="k/c.kv",
                         token_count=64, position_span=64, model_fingerprint="fp1",
                         source="0")],
        model_fingerprint="fp1",
    )  # fmt: skip
    fields.update(overrides)
    return ConceptManifest(**fields)


def test_json_round_trip_is_lossless():
    manifest = make_manifest()
    data = manifest.to_json()
    assert isinstance(data, bytes)
    again = ConceptManifest.from_json(data)
    assert again == manifest
    assert again.format_version == MANIFEST_FORMAT_VERSION
    assert again.updated_at.tzinfo is not None
    assert again.patches[0].box == (1, 2, 30, 40)


def test_minimal_manifest_defaults_to_queued():
    manifest = ConceptManifest(user_id="bob", concept_id="mug", profile={"name": "Mug"})
    assert manifest.state == "queued" and manifest.photos == [] and manifest.chunks == []
    assert ConceptManifest.from_json(manifest.to_json().decode()) == manifest


def test_object_keys_lists_photos_then_chunks():
    assert make_manifest().object_keys() == ["k/p.png", "k/c.kv"]


@pytest.mark.parametrize(
    "overrides",
    [
        {"user_id": "../bob"},
        {"user_id": "Bob"},
        {"concept_id": "a/b"},
        {"concept_id": ""},
        {"state": "done"},
        {"format_version": MANIFEST_FORMAT_VERSION + 1},
        {"format_version": 0},
        {"state": "failed"},  # needs failure_reason
        {"unknown_field": 1},
        {"patches": [PatchRecord(photo_id=CHUNK, box=(0, 0, 1, 1), score=0.0)]},  # no such photo
    ],
)
def test_invalid_manifests_are_refused(overrides):
    with pytest.raises(ValidationError):
        make_manifest(**overrides)


def test_failed_state_with_reason_is_fine():
    assert make_manifest(state="failed", failure_reason="no object found").state == "failed"


@pytest.mark.parametrize("box", [(0, 0, 0, 5), (5, 0, 1, 5), (-1, 0, 3, 3), (0, 9, 5, 3)])
def test_degenerate_boxes_are_refused(box):
    with pytest.raises(ValidationError, match="box"):
        PatchRecord(photo_id=PHOTO, box=box, score=1.0)


@pytest.mark.parametrize("bad_id", ["A" * 64, "x" * 64, PHOTO[:-1], "../" + PHOTO])
def test_record_ids_must_be_sha256_hex(bad_id):
    with pytest.raises(ValidationError, match="sha256"):
        PhotoRecord(photo_id=bad_id, object_key="k", media_type="image/png",
                    width=1, height=1, bytes=1)  # fmt: skip
    with pytest.raises(ValidationError, match="sha256"):
        ChunkRef(chunk_id=bad_id, kind="profile_text", object_key="k", token_count=1,
                 position_span=1, model_fingerprint="fp", source="profile")  # fmt: skip


def test_tampered_json_is_refused_on_read():
    data = make_manifest().to_json().decode().replace('"alice"', '"../alice"')
    with pytest.raises(ValidationError):
        ConceptManifest.from_json(data)


def test_manifest_written_with_the_old_span_name_still_loads():
    # Before issue 11 a chunk record stored the span as "position_extent" (ChunkMeta's name for
    # the next free position). Such manifests load with the value under position_span.
    data = json.loads(make_manifest().to_json())
    for chunk in data["chunks"]:
        chunk["position_extent"] = chunk.pop("position_span")
    old = ConceptManifest.from_json(json.dumps(data))
    assert [c.position_span for c in old.chunks] == [c.position_span for c in make_manifest().chunks]
    assert '"position_extent"' not in old.to_json().decode()
    assert old.chunks == make_manifest().chunks


def test_a_chunk_ref_is_immutable():
    # Manifests, index entries and search hits share one ChunkRef: nobody may change it in place.
    chunk = make_manifest().chunks[0]
    with pytest.raises(ValidationError, match="frozen"):
        chunk.token_count = 1
    assert chunk.model_copy(update={"source": "1"}).source == "1" and chunk.source == "0"
