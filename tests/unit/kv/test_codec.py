"""KV chunk codec: bit-exact round trip, int8 error bound, and every kind of bad blob refused."""

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
        content_hash="a" * 64, token_count=tokens, start_position=20, position_extent=25,
        num_layers=layers, dtype=str(dtype).removeprefix("torch."), position_axes=3,
        framing="b" * 64, source="patch:0",
    )
    keys = [(torch.randn(2, tokens, 16, generator=gen) * 3).to(dtype) for _ in range(layers)]
    values = [torch.randn(2, tokens, 16, generator=gen).to(dtype) for _ in range(layers)]
    positions = torch.arange(20, 20 + tokens).expand(3, -1).clone()
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
