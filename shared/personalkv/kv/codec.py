"""Bytes of a KV chunk: safetensors (no pickle), versioned, optionally int8-quantized.

Layout: one safetensors file. Tensors ``k.<layer>`` / ``v.<layer>`` (or, quantized, ``k.<layer>.q``
int8 plus ``k.<layer>.scale`` float32 per channel), ``positions``, ``token_ids`` and optionally
``image_embeds``. The safetensors string metadata holds ``format`` (``personalkv.kvchunk``),
``version``, ``quantization``, ``meta`` (the ChunkMeta as JSON) and ``checksum`` (sha256 of all
tensor bytes in name order), so a flipped bit anywhere in the payload is caught.

int8 quantization is symmetric per channel: for every layer, kv head and head-dim channel, the
scale is max|x| over the chunk's tokens / 127, so each element's error is at most scale / 2
(= max|x_channel| / 254). Reuse quality in the KV-cache literature holds at this precision
(KIVI, KVQuant quantize keys per channel for the same reason: key outliers are channel-wise).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from personalkv.kv.chunk import ChunkMeta, KVChunk

FORMAT_NAME = "personalkv.kvchunk"
FORMAT_VERSION = 1
QUANTIZATIONS = ("none", "int8")


class ChunkFormatError(ValueError):
    """A blob is not a usable KV chunk. Subclasses say why."""


class TruncatedChunkError(ChunkFormatError):
    pass


class CorruptChunkError(ChunkFormatError):
    pass


class ChunkVersionError(ChunkFormatError):
    pass


class ChunkModelMismatchError(ChunkFormatError):
    pass


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel symmetric int8 over the token axis of ``(heads, tokens, dim)``."""
    x32 = x.float()
    scale = x32.abs().amax(dim=-2, keepdim=True) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(x32 / scale), -127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


def encode_chunk(chunk: KVChunk, quantization: str = "none") -> bytes:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; known: {', '.join(QUANTIZATIONS)}")
    tensors: dict[str, torch.Tensor] = {}
    for layer, (k, v) in enumerate(zip(chunk.keys, chunk.values)):
        for prefix, tensor in (("k", k), ("v", v)):
            tensor = tensor.detach().to("cpu").contiguous()
            if quantization == "int8":
                q, scale = quantize_int8(tensor)
                tensors[f"{prefix}.{layer}.q"] = q
                tensors[f"{prefix}.{layer}.scale"] = scale
            else:
                tensors[f"{prefix}.{layer}"] = tensor
    # int32 on disk (positions and vocabularies are far below 2**31); int64 in memory.
    tensors["positions"] = chunk.positions.detach().to("cpu", torch.int32).contiguous()
    tensors["token_ids"] = chunk.token_ids.detach().to("cpu", torch.int32).contiguous()
    if chunk.image_embeds is not None:
        tensors["image_embeds"] = chunk.image_embeds.detach().to("cpu").contiguous()
    metadata = {
        "format": FORMAT_NAME,
        "version": str(FORMAT_VERSION),
        "quantization": quantization,
        "meta": json.dumps(dataclasses.asdict(chunk.meta), sort_keys=True),
        "checksum": _checksum(tensors),
    }
    return st_save(tensors, metadata=metadata)


def read_header(blob: bytes) -> dict:
    """Parse and sanity-check the safetensors header without touching the tensors."""
    if len(blob) < 8:
        raise TruncatedChunkError(f"truncated chunk: {len(blob)} bytes, not even a header length")
    (header_len,) = struct.unpack("<Q", blob[:8])
    if header_len > 100_000_000:
        raise CorruptChunkError(f"corrupt chunk: implausible header length {header_len}")
    if len(blob) < 8 + header_len:
        raise TruncatedChunkError(
            f"truncated chunk: header needs {8 + header_len} bytes, blob has {len(blob)}"
        )
    try:
        header = json.loads(blob[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptChunkError(f"corrupt chunk: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CorruptChunkError("corrupt chunk: header is not a JSON object")
    data_end = max(
        (entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"),
        default=0,
    )
    expected = 8 + header_len + data_end
    if len(blob) < expected:
        raise TruncatedChunkError(f"truncated chunk: expected {expected} bytes, got {len(blob)}")
    if len(blob) > expected:
        raise CorruptChunkError(f"corrupt chunk: {len(blob) - expected} trailing bytes after the data")
    return header


def decode_chunk(
    blob: bytes,
    *,
    expected_model: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> KVChunk:
    """Bytes -> KVChunk, refusing (with a specific error) anything not exactly right.

    ``expected_model``: the fingerprint of the model that will consume the chunk; a chunk computed
    by any other model (or config, weights, dtype) is refused, since its KV would be meaningless.
    ``dtype``: cast keys/values (e.g. int8 chunks dequantize to the model's dtype).
    """
    header = read_header(blob)
    metadata = header.get("__metadata__") or {}
    if metadata.get("format") != FORMAT_NAME:
        raise CorruptChunkError(f"not a KV chunk: format is {metadata.get('format')!r}")
    if metadata.get("version") != str(FORMAT_VERSION):
        raise ChunkVersionError(
            f"unsupported chunk format version {metadata.get('version')!r}; this build reads {FORMAT_VERSION}"
        )
    try:
        meta = ChunkMeta(**json.loads(metadata["meta"]))
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise CorruptChunkError(f"corrupt chunk: bad metadata ({exc})") from None
    if expected_model is not None and meta.model_fingerprint != expected_model:
        raise ChunkModelMismatchError(
            f"chunk was computed by model {meta.model_fingerprint[:16]}, not by the serving model "
            f"{expected_model[:16]}"
        )
    try:
        tensors = st_load(blob)
    except Exception as exc:  # safetensors raises its own error types
        raise CorruptChunkError(f"corrupt chunk: {exc}") from None
    if _checksum(tensors) != metadata.get("checksum"):
        raise CorruptChunkError("corrupt chunk: checksum mismatch (payload bytes changed)")

    quantization = metadata.get("quantization", "none")
    stored_dtype = getattr(torch, meta.dtype)
    target = dtype or stored_dtype
    keys, values = [], []
    for layer in range(meta.num_layers):
        for prefix, out in (("k", keys), ("v", values)):
            if quantization == "int8":
                tensor = dequantize_int8(
                    tensors[f"{prefix}.{layer}.q"], tensors[f"{prefix}.{layer}.scale"], target
                )
            else:
                tensor = tensors[f"{prefix}.{layer}"].to(target)
            out.append(tensor.to(device))
    image_embeds = tensors.get("image_embeds")
    return KVChunk(
        meta=meta,
        keys=keys,
        values=values,
        positions=tensors["positions"].to(device, torch.int64),
        token_ids=tensors["token_ids"].to(device, torch.int64),
        image_embeds=None if image_embeds is None else image_embeds.to(device, target),
    )
