"""Ask over tampered chunk blobs (one process: local store, the in-memory index, tiny
Qwen2-VL): every malformed blob is skipped, counted and logged (once per process); the request
still answers from the rest, and lists as used only the concepts whose chunks it placed. A
chunk that fails verification gets its concept's caching run enqueued at once (repair on
sight), which encodes every tampered or missing chunk again; the concept stays ready."""

from __future__ import annotations

import json
import logging
import struct

import pytest

from personalkv.kv import codec
from personalkv.service_layer import answering, concepts, evidence, pipeline
from personalkv.service_layer.answering import AskOptions

BLUE = (30, 60, 200)


def _resigned(blob: bytes, **meta_changes) -> bytes:
    """The blob with meta fields changed and the checksum recomputed (a forger's edit)."""
    from safetensors.torch import load as st_load

    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    metadata = header["__metadata__"]
    meta = json.loads(metadata["meta"])
    meta.update(meta_changes)
    metadata["meta"] = json.dumps(meta, sort_keys=True)
    metadata["checksum"] = codec._checksum({k: v for k, v in metadata.items()}, st_load(blob))
    encoded = json.dumps(header).encode()
    encoded += b" " * ((8 - len(encoded) % 8) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + blob[8 + n :]


def _flip_byte(blob: bytes) -> bytes:
    data = bytearray(blob)
    data[-3] ^= 0x10
    return bytes(data)


def test_ask_skips_every_kind_of_tampered_chunk(svc, photo_of, caplog):
    concepts.create_concept(svc, "alice", "mug", "Bobo", "mug", "my Bobo mug")
    m = concepts.add_photos(svc, "alice", "mug", [photo_of(BLUE, k) for k in range(2)])
    m = concepts.get_concept(svc, "alice", "mug")
    assert m.state == "ready" and len(m.chunks) >= 4
    store = svc.store.objects
    tampered = {
        m.chunks[0].object_key: lambda b: _flip_byte(b),
        m.chunks[1].object_key: lambda b: _resigned(b, start_position=999),
        m.chunks[2].object_key: lambda b: _resigned(b, num_layers=99),
        m.chunks[3].object_key: lambda b: _resigned(b, user_id="mallory"),
    }
    for key, edit in tampered.items():
        store.put(key, edit(store.get(key)))
    svc.chunk_cache.invalidate("alice")
    evidence._reported.clear()  # (chunk ids repeat across tests: same user, concept, photos)
    with caplog.at_level(logging.DEBUG, logger="personalkv.service_layer.evidence"), \
            caplog.at_level(logging.INFO, logger="personalkv.service_layer.pipeline"):
        result = answering.ask(svc, "alice", "Where is Bobo?", [], AskOptions(max_new_tokens=3))
        assert result.skipped_chunks == len(tampered)
        assert {c for c, *_ in result.chunks}.isdisjoint({k.rsplit("/", 1)[1][:-3] for k in tampered})
        assert len(result.chunks) == len(m.chunks) - len(tampered)
        warnings = [r.getMessage() for r in caplog.records
                    if r.levelno >= logging.WARNING and r.name == evidence.__name__]
        assert sum("unusable" in w for w in warnings) == len(tampered)
        assert all("personalkv recache --user alice" in w for w in warnings)  # what repairs it
        # Repair on sight: the concept's caching run was enqueued at once (this svc's queue is
        # inline: it ran before the Ask returned); it verified every stored chunk and encoded the
        # refused ones again; the manifest, and so the chunk ids, stay as they were.
        assert "repair of alice/mug enqueued" in caplog.text
        assert f"({len(tampered)} encoded, of which {len(tampered)} repairs;" in caplog.text
    repaired = concepts.get_concept(svc, "alice", "mug")
    assert repaired.state == "ready" and repaired.chunks == m.chunks
    fixed = answering.ask(svc, "alice", "Where is Bobo?", [], AskOptions(max_new_tokens=3))
    assert fixed.skipped_chunks == 0 and len(fixed.chunks) == len(m.chunks)


def test_a_chunk_skipped_again_is_logged_once_and_repaired_once(svc, photo_of, caplog, monkeypatch):
    concepts.create_concept(svc, "alice", "mug", "Bobo", "mug", "my Bobo mug")
    concepts.add_photos(svc, "alice", "mug", [photo_of(BLUE, 1)])
    m = concepts.get_concept(svc, "alice", "mug")
    enqueued = []
    monkeypatch.setattr(svc.task_queue, "enqueue_caching", lambda u, c: enqueued.append((u, c)))  # a queue nobody drains
    key = m.chunks[0].object_key
    svc.store.objects.put(key, _flip_byte(svc.store.objects.get(key)))
    svc.chunk_cache.invalidate("alice")
    evidence._reported.clear()
    with caplog.at_level(logging.DEBUG, logger="personalkv.service_layer.evidence"):
        first = answering.ask(svc, "alice", "Where is Bobo?", [], AskOptions(max_new_tokens=2))
        caplog.clear()
        again = answering.ask(svc, "alice", "Where is Bobo?", [], AskOptions(max_new_tokens=2))
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # logged once
    assert first.skipped_chunks == again.skipped_chunks == 1  # still skipped and counted
    assert enqueued == [("alice", "mug")]  # one repair, not one per Ask


def test_a_concept_whose_chunks_all_fail_is_not_listed_as_used(svc, photo_of):
    concepts.create_concept(svc, "alice", "mug", "Bobo", "mug", "my Bobo mug")
    concepts.add_photos(svc, "alice", "mug", [photo_of(BLUE, 1)])
    m = concepts.get_concept(svc, "alice", "mug")
    for ref in m.chunks:
        svc.store.objects.delete(ref.object_key)  # missing: skipped, no repair enqueued
    svc.chunk_cache.invalidate("alice")
    result = answering.ask(svc, "alice", "Where is Bobo?", [], AskOptions(max_new_tokens=2))
    assert result.skipped_chunks == len(m.chunks) and result.chunks == []
    assert result.concepts == [] and not result.personal_evidence_used


def test_a_missing_chunk_object_is_encoded_again_and_the_concept_stays_ready(svc, photo_of):
    concepts.create_concept(svc, "alice", "mug", "Bobo", "mug", "my Bobo mug")
    concepts.add_photos(svc, "alice", "mug", [photo_of(BLUE, 1)])
    m = concepts.get_concept(svc, "alice", "mug")
    svc.store.objects.delete(m.chunks[-1].object_key)
    svc.chunk_cache.invalidate("alice")
    assert answering.ask(svc, "alice", "Where is Bobo?", [],
                         AskOptions(max_new_tokens=2)).skipped_chunks == 1
    after = pipeline.cache_concept(svc, "alice", "mug")  # what `personalkv recache` runs
    assert (after.state, after.failure_reason, after.chunks) == ("ready", None, m.chunks)
    assert svc.store.objects.exists(m.chunks[-1].object_key)


def test_a_failure_reason_names_no_object_key_or_exception_class(svc, photo_of, monkeypatch):
    concepts.create_concept(svc, "alice", "mug", "Bobo", "mug", "my Bobo mug")
    concepts.add_photos(svc, "alice", "mug", [photo_of(BLUE, 1)])
    m = concepts.get_concept(svc, "alice", "mug")

    def broken(*args, **kwargs):
        raise KeyError(f"{m.chunks[0].object_key} vanished")

    monkeypatch.setattr(pipeline, "index_concept", broken)  # any internal error will do
    with pytest.raises(KeyError):
        pipeline.cache_concept(svc, "alice", "mug")
    failed = concepts.get_concept(svc, "alice", "mug")
    assert failed.state == "failed"
    assert failed.failure_reason.startswith("caching failed on an internal error")
    for leak in ("users/", "KeyError", ".kv"):
        assert leak not in failed.failure_reason


def test_sending_a_known_photo_again_checks_and_repairs_the_concepts_chunks(svc, photo_of):
    """Issue 30: the user's way to ask for a check: re-sending a photo of a ready concept
    re-checks its chunks; a damaged one is encoded again (tasks inline here)."""
    concepts.create_concept(svc, "alice", "mug", "Bobo", "mug", "my Bobo mug")
    photo = photo_of(BLUE, 0)
    m = concepts.add_photos(svc, "alice", "mug", [photo])
    m = concepts.get_concept(svc, "alice", "mug")
    assert m.state == "ready"
    store, key = svc.store.objects, m.chunks[0].object_key
    good = store.get(key)
    assert evidence.damaged_chunks(svc, m) == []
    store.put(key, _flip_byte(good))
    assert evidence.damaged_chunks(svc, m) == [m.chunks[0].chunk_id]
    concepts.add_photos(svc, "alice", "mug", [photo])  # nothing new: a check, and the repair
    after = concepts.get_concept(svc, "alice", "mug")
    assert after.state == "ready" and evidence.damaged_chunks(svc, after) == []
    assert len(after.photos) == 1
