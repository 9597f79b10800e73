"""Ask over tampered chunk blobs (one process: local store, the in-memory index, tiny
Qwen2-VL): every malformed blob is skipped, counted and logged; the request still answers from the rest. A
caching run that finds a tampered blob at a chunk's key encodes the chunk again."""

from __future__ import annotations

import json
import logging
import struct


from personalkv.kv import codec
from personalkv.service_layer import answering, concepts, pipeline
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
    with caplog.at_level(logging.ERROR, logger="personalkv.service_layer.answering"):
        result = answering.ask(svc, "alice", "Where is Bobo?", [], AskOptions(max_new_tokens=3))
    assert result.skipped_chunks == len(tampered)
    assert {c for c, *_ in result.chunks}.isdisjoint({k.rsplit("/", 1)[1][:-3] for k in tampered})
    assert len(result.chunks) == len(m.chunks) - len(tampered)
    assert sum("unusable" in r.getMessage() for r in caplog.records) == len(tampered)

    # A caching run (redelivered, or `personalkv recache`) repairs what it can verify is bad:
    # the manifest no longer lists them as known, so they are looked up by key and re-encoded.
    current = concepts.get_concept(svc, "alice", "mug")
    svc.store.write_manifest(current.model_copy(update={"chunks": []}))
    pipeline.cache_concept(svc, "alice", "mug")
    svc.chunk_cache.invalidate("alice")
    again = answering.ask(svc, "alice", "Where is Bobo?", [], AskOptions(max_new_tokens=3))
    assert again.skipped_chunks == 0 and len(again.chunks) == len(m.chunks)
