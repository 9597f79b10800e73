"""KV chunk codec: bit-exact round trip, int8 error bound, and every kind of bad blob refused:
each header field edited (checksum mismatch), and each invariant broken in a blob whose
checksum was recomputed (as a forger would), raises a ChunkFormatError."""

from __future__ import annotations

import dataclasses
import json
import struct

import pytest
import torch
from safetensors.torch import save as st_save

from personalkv.kv import codec
from personalkv.kv.chunk import ChunkMeta, KVChunk
from personalkv.kv.codec import (
    ChunkModelMismatchError,
    ChunkVersionError,
    CorruptChunkError,
    TruncatedChunkError,
    decode_chunk,
    encode_chunk,
)


def synthetic_chunk(dtype=torch.float32, tokens=7, layers=3, with_image=True, seed=0) -> KVChunk:
    gen = torch.Generator().manual_seed(seed)
    meta = ChunkMeta(
        model_fingerprint="f" * 64, user_id="alice", concept_id="bo", kind="image_patch",
        content_hash="a" * 64, token_count=tokens, start_position=20,
        position_extent=min(20 + tokens, 25),
        num_layers=layers, dtype=str(dtype).removeprefix("torch."), position_axes=3,
        framing="b" * 64, source="patch:0",
    )
    keys = [(torch.randn(2, tokens, 16, generator=gen) * 3).to(dtype) for _ in range(layers)]
    values = [torch.randn(2, tokens, 16, generator=gen).to(dtype) for _ in range(layers)]
    # M-RoPE-like: the last tokens share a position, so the extent (25) < start + tokens (27).
    positions = torch.tensor([min(20 + i, 24) for i in range(tokens)]).expand(3, -1).clone()
    return KVChunk(
        meta=meta, keys=keys, values=values, positions=positions,
        token_ids=torch.arange(tokens), image_embeds=torch.randn(4, 32, generator=gen).to(dtype) if with_image else None,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_bit_exact(dtype):
    chunk = synthetic_chunk(dtype)
    back = decode_chunk(encode_chunk(chunk), expected_model=chunk.meta.model_fingerprint)
    assert back.meta == chunk.meta
    for a, b in zip(chunk.keys + chunk.values, back.keys + back.values):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert torch.equal(back.positions, chunk.positions)
    assert torch.equal(back.token_ids, chunk.token_ids)
    assert torch.equal(back.image_embeds, chunk.image_embeds)


def test_text_chunk_without_image_embeds_round_trips():
    chunk = synthetic_chunk(with_image=False)
    assert decode_chunk(encode_chunk(chunk)).image_embeds is None


def test_salience_round_trips_and_is_optional():
    chunk = synthetic_chunk()
    chunk.salience = torch.linspace(0, 1, chunk.meta.token_count)
    back = decode_chunk(encode_chunk(chunk, "int8"))
    assert back.salience.dtype == torch.float32 and torch.equal(back.salience, chunk.salience)
    assert decode_chunk(encode_chunk(synthetic_chunk())).salience is None  # chunks stored before it


@pytest.mark.parametrize("bad", [torch.ones(3), torch.full((7,), -1.0), torch.full((7,), float("nan")),
                                 torch.ones(7, dtype=torch.float64)])
def test_salience_of_the_wrong_shape_sign_or_type_is_refused(bad):
    """A forger's consistent blob (checksum recomputed) with a salience the selection cannot use."""
    chunk = synthetic_chunk()
    blob = encode_chunk(chunk)
    tensors = codec.st_load(blob)
    tensors["salience"] = bad
    metadata = json.loads(blob[8:8 + struct.unpack("<Q", blob[:8])[0]])["__metadata__"]
    metadata["checksum"] = codec._checksum(metadata, tensors)
    with pytest.raises(CorruptChunkError, match="salience"):
        decode_chunk(st_save(tensors, metadata=metadata))


def test_int8_error_within_half_a_step_per_channel():
    chunk = synthetic_chunk(torch.float32, tokens=64)
    back = decode_chunk(encode_chunk(chunk, quantization="int8"))
    for original, restored in zip(chunk.keys + chunk.values, back.keys + back.values):
        # Bound: round-to-nearest on a grid of step max|x_channel|/127 errs by at most half a step.
        bound = original.abs().amax(dim=-2, keepdim=True) / 254.0
        assert ((restored - original).abs() <= bound * (1 + 1e-5) + 1e-7).all()
    # and it is not a no-op: int8 really is lossy, and smaller
    assert not torch.equal(back.keys[0], chunk.keys[0])
    assert len(encode_chunk(chunk, "int8")) < 0.4 * len(encode_chunk(chunk))


def test_int8_dequantizes_to_requested_dtype():
    chunk = synthetic_chunk(torch.bfloat16)
    back = decode_chunk(encode_chunk(chunk, "int8"))
    assert back.keys[0].dtype == torch.bfloat16


def test_unknown_quantization_refused():
    with pytest.raises(ValueError, match="unknown quantization"):
        encode_chunk(synthetic_chunk(), quantization="int4")


@pytest.mark.parametrize("cut", [0, 5, 100, -1])
def test_truncated_blob_refused(cut):
    blob = encode_chunk(synthetic_chunk())
    truncated = blob[:cut] if cut >= 0 else blob[:-1]
    with pytest.raises(TruncatedChunkError, match="truncated"):
        decode_chunk(truncated)


def test_flipped_payload_byte_refused_as_corrupt():
    blob = bytearray(encode_chunk(synthetic_chunk()))
    blob[-10] ^= 0x40
    with pytest.raises(CorruptChunkError, match="checksum"):
        decode_chunk(bytes(blob))


def test_garbage_header_refused_as_corrupt():
    blob = struct.pack("<Q", 12) + b"not json!!!!" + b"\0" * 16
    with pytest.raises(CorruptChunkError, match="not valid JSON"):
        decode_chunk(blob)


def test_foreign_safetensors_file_refused():
    blob = st_save({"x": torch.zeros(3)}, metadata={"format": "pt"})
    with pytest.raises(CorruptChunkError, match="not a KV chunk"):
        decode_chunk(blob)


def _rewrite_metadata(blob: bytes, **changes) -> bytes:
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    header["__metadata__"].update(changes)
    encoded = json.dumps(header).encode()
    encoded += b" " * ((8 - len(encoded) % 8) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + blob[8 + n :]


def test_wrong_version_refused():
    blob = _rewrite_metadata(encode_chunk(synthetic_chunk()), version="99")
    with pytest.raises(ChunkVersionError, match="version '99'"):
        decode_chunk(blob)


def test_wrong_model_refused():
    chunk = synthetic_chunk()
    with pytest.raises(ChunkModelMismatchError, match="not by the serving model"):
        decode_chunk(encode_chunk(chunk), expected_model="0" * 64)


def test_tampered_metadata_refused():
    chunk = synthetic_chunk()
    meta = dataclasses.asdict(chunk.meta)
    meta.pop("framing")
    blob = _rewrite_metadata(encode_chunk(chunk), meta=json.dumps(meta))
    with pytest.raises(CorruptChunkError, match="bad metadata"):
        decode_chunk(blob)


def test_error_classes_are_distinct():
    kinds = {TruncatedChunkError, CorruptChunkError, ChunkVersionError, ChunkModelMismatchError}
    assert all(issubclass(k, codec.ChunkFormatError) for k in kinds)
    assert len(kinds) == 4


# -- tamper evidence: every header field is covered by the checksum --------------------------
def _header(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _with_metadata(blob: bytes, metadata: dict, *, resign: bool) -> bytes:
    """`blob` with its safetensors metadata replaced; `resign` recomputes the checksum the way
    a forger with the codec would, so that only the decode invariants can catch the edit."""
    header, data = _header(blob)
    metadata = dict(metadata)
    if resign:
        from safetensors.torch import load as st_load

        metadata["checksum"] = codec._checksum(metadata, st_load(blob))
    header["__metadata__"] = metadata
    encoded = json.dumps(header).encode()
    encoded += b" " * ((8 - len(encoded) % 8) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + data


def _edit_meta(blob: bytes, resign: bool, **changes) -> bytes:
    metadata = _header(blob)[0]["__metadata__"]
    meta = json.loads(metadata["meta"])
    meta.update(changes)
    return _with_metadata(blob, {**metadata, "meta": json.dumps(meta, sort_keys=True)}, resign=resign)


_META_EDITS = {
    "model_fingerprint": "e" * 64, "user_id": "mallory", "concept_id": "other",
    "kind": "profile_text", "content_hash": "c" * 64, "token_count": 6, "start_position": 21,
    "position_extent": 26, "num_layers": 2, "dtype": "float16", "position_axes": 1,
    "framing": "d" * 64, "source": "patch:1",
}


def test_every_meta_field_is_edited_in_the_test():
    assert set(_META_EDITS) == {f.name for f in dataclasses.fields(ChunkMeta)}


@pytest.mark.parametrize("field", sorted(_META_EDITS))
def test_editing_any_meta_field_breaks_the_checksum(field):
    blob = encode_chunk(synthetic_chunk())
    with pytest.raises(CorruptChunkError, match="checksum mismatch"):
        decode_chunk(_edit_meta(blob, False, **{field: _META_EDITS[field]}))


@pytest.mark.parametrize("key,value", [("quantization", "int8"), ("quantization", "int4"),
                                       ("format", "personalkv.kvchunk "), ("extra", "x")])
def test_editing_any_other_metadata_entry_is_refused(key, value):
    blob = encode_chunk(synthetic_chunk())
    metadata = {**_header(blob)[0]["__metadata__"], key: value}
    with pytest.raises(codec.ChunkFormatError):
        decode_chunk(_with_metadata(blob, metadata, resign=False))


# A forger who recomputes the checksum still meets the invariants placement relies on.
@pytest.mark.parametrize("changes,message", [
    ({"start_position": 21}, "positions span"),
    ({"position_extent": 30}, "positions span"),
    ({"position_extent": 19}, "position_extent 19 <= start_position"),
    ({"token_count": 6}, r"expected int32 \(3, 6\)"),
    ({"num_layers": 4}, "tensors do not match 4 layers"),
    ({"num_layers": 2}, "tensors do not match 2 layers"),
    ({"num_layers": 0}, "num_layers"),
    ({"dtype": "float16"}, "expected 3-d torch.float16"),
    ({"dtype": "complex64"}, "dtype 'complex64'"),
    ({"kind": "video"}, "kind 'video'"),
    ({"position_axes": 1}, "positions"),
    ({"position_axes": 2}, "position_axes 2"),
    ({"token_count": "7"}, "not an int"),
    ({"start_position": True}, "not an int"),
    ({"user_id": "../bob"}, "user id"),
    ({"content_hash": "xyz"}, "content_hash is not a sha256"),
])
def test_resigned_header_that_breaks_an_invariant_is_refused(changes, message):
    blob = _edit_meta(encode_chunk(synthetic_chunk()), True, **changes)
    with pytest.raises(CorruptChunkError, match=message):
        decode_chunk(blob)


@pytest.mark.parametrize("quantization,message", [
    ("int4", "unknown quantization 'int4'"),  # refused, not read as none
    ("int8", "tensors do not match"),  # an int8 label on float tensors
])
def test_resigned_quantization_label_that_does_not_fit_is_refused(quantization, message):
    blob = encode_chunk(synthetic_chunk())
    metadata = {**_header(blob)[0]["__metadata__"], "quantization": quantization}
    with pytest.raises(CorruptChunkError, match=message):
        decode_chunk(_with_metadata(blob, metadata, resign=True))


def test_owner_and_id_are_checked_against_where_the_blob_was_found():
    blob = encode_chunk(synthetic_chunk())
    assert decode_chunk(blob, expected_user="alice", expected_chunk_id="a" * 64).meta.user_id == "alice"
    with pytest.raises(CorruptChunkError, match="another user"):
        decode_chunk(blob, expected_user="bob")
    with pytest.raises(CorruptChunkError, match="stored as"):
        decode_chunk(blob, expected_chunk_id="b" * 64)
    forged = _edit_meta(blob, True, user_id="bob")  # re-signed, but found under alice's key
    with pytest.raises(CorruptChunkError, match="another user"):
        decode_chunk(forged, expected_user="alice")


def test_version_1_blob_is_refused_with_a_recache_hint():
    blob = encode_chunk(synthetic_chunk())
    metadata = {**_header(blob)[0]["__metadata__"], "version": "1"}
    with pytest.raises(ChunkVersionError, match="personalkv recache"):
        decode_chunk(_with_metadata(blob, metadata, resign=True))


def test_format_version_is_part_of_the_chunk_id():
    from personalkv.kv import chunk as chunk_module

    args = dict(model_fingerprint="f" * 64, framing="b" * 64, user_id="alice",
                concept_id="bo", kind="profile_text", content=b"x")
    now = chunk_module.chunk_content_hash(**args)
    saved = chunk_module.CHUNK_FORMAT_VERSION
    try:
        chunk_module.CHUNK_FORMAT_VERSION = saved - 1
        assert chunk_module.chunk_content_hash(**args) != now
    finally:
        chunk_module.CHUNK_FORMAT_VERSION = saved


@pytest.mark.parametrize("mutate", ["swap_tensor_shape", "bad_offsets", "non_string_metadata"])
def test_structurally_broken_headers_raise_chunk_format_errors(mutate):
    blob = encode_chunk(synthetic_chunk())
    header, data = _header(blob)
    if mutate == "swap_tensor_shape":
        header["k.0"]["shape"] = list(reversed(header["k.0"]["shape"]))
    elif mutate == "bad_offsets":
        header["k.0"].pop("data_offsets")
    else:
        header["__metadata__"]["version"] = 2
    encoded = json.dumps(header).encode()
    encoded += b" " * ((8 - len(encoded) % 8) % 8)
    with pytest.raises(codec.ChunkFormatError):
        decode_chunk(struct.pack("<Q", len(encoded)) + encoded + data)


def test_read_meta_gives_the_typed_meta_and_the_span_from_the_header_alone():
    chunk = synthetic_chunk()
    blob = encode_chunk(chunk, "int8")
    meta = codec.read_meta(blob)
    assert meta == chunk.meta
    # M-RoPE: 7 tokens advance the positions by 5 (next free position 25, start 20).
    assert (meta.position_extent, meta.position_span) == (25, 5)
    with pytest.raises(ChunkVersionError):
        codec.read_meta(_rewrite_metadata(blob, version="99"))
    with pytest.raises(TruncatedChunkError):
        codec.read_meta(blob[:4])
