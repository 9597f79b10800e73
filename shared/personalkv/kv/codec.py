"""Bytes of a KV chunk: safetensors (no pickle), versioned, optionally int8-quantized.

Layout: one safetensors file. Tensors ``k.<layer>`` / ``v.<layer>`` (or, quantized, ``k.<layer>.q``
int8 plus ``k.<layer>.scale`` float32 per channel), ``positions``, ``token_ids`` and optionally
``image_embeds`` and ``salience`` (float32 per token: see ``KVChunk``). The safetensors string metadata holds ``format`` (``personalkv.kvchunk``),
``version``, ``quantization``, ``meta`` (the ChunkMeta as JSON) and ``checksum``: sha256 over
every other metadata entry *and* all tensor bytes (name, dtype, shape, data, in name order), so a
changed bit anywhere - a tensor, the start position, the owner, the layer count - is caught.
It is a checksum, not a signature: whoever can write the bucket can write a consistent blob,
which is why decoding also checks every invariant the placement code relies on.

Decoding refuses, always with a ``ChunkFormatError`` subclass: truncated or trailing bytes,
a header that is not the format's, another format version (version 1 blobs predate the header
checksum: ``personalkv recache`` re-encodes them), a checksum mismatch, metadata of the wrong
type or out of range (kind, axes, dtype and quantization names), tensors missing or extra for
the layer count, shapes that disagree with the token count or with each other, and positions
whose first value is not ``start_position`` or whose last + 1 is not ``position_extent``.

int8 quantization is symmetric per channel: for every layer, kv head and head-dim channel, the
scale is max|x| over the chunk's tokens / 127, so each element's error is at most scale / 2
(= max|x_channel| / 254). Reuse quality in the KV-cache literature holds at this precision
(KIVI, KVQuant quantize keys per channel for the same reason: key outliers are channel-wise).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import struct

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from personalkv.ids import InvalidIdError, validate_concept_id, validate_user_id
from personalkv.kv.chunk import CHUNK_FORMAT_VERSION, CHUNK_KINDS, ChunkMeta, KVChunk

FORMAT_NAME = "personalkv.kvchunk"
FORMAT_VERSION = CHUNK_FORMAT_VERSION
QUANTIZATIONS = ("none", "int8")
#: dtype names a chunk may be computed in (``ChunkMeta.dtype``), as torch spells them.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_HEX64 = re.compile(r"[0-9a-f]{64}")
_MAX_HEADER_BYTES = 100_000_000


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


def _checksum(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the metadata (all but the checksum itself) and every tensor."""
    digest = hashlib.sha256()
    signed = {k: v for k, v in metadata.items() if k != "checksum"}
    digest.update(json.dumps(signed, sort_keys=True).encode())
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
    if chunk.salience is not None:
        tensors["salience"] = chunk.salience.detach().to("cpu", torch.float32).contiguous()
    metadata = {
        "format": FORMAT_NAME,
        "version": str(FORMAT_VERSION),
        "quantization": quantization,
        "meta": json.dumps(dataclasses.asdict(chunk.meta), sort_keys=True),
    }
    metadata["checksum"] = _checksum(metadata, tensors)
    return st_save(tensors, metadata=metadata)


def _read_header(blob: bytes) -> dict:
    """Parse and sanity-check the safetensors header without touching the tensors."""
    if len(blob) < 8:
        raise TruncatedChunkError(f"truncated chunk: {len(blob)} bytes, not even a header length")
    (header_len,) = struct.unpack("<Q", blob[:8])
    if header_len > _MAX_HEADER_BYTES:
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
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptChunkError("corrupt chunk: metadata is not a map of strings")
    try:
        data_end = max(
            (int(entry["data_offsets"][1]) for name, entry in header.items()
             if name != "__metadata__"),
            default=0,
        )
    except (KeyError, TypeError, ValueError, IndexError):
        raise CorruptChunkError("corrupt chunk: a tensor entry has no valid data_offsets") from None
    expected = 8 + header_len + data_end
    if len(blob) < expected:
        raise TruncatedChunkError(f"truncated chunk: expected {expected} bytes, got {len(blob)}")
    if len(blob) > expected:
        raise CorruptChunkError(f"corrupt chunk: {len(blob) - expected} trailing bytes after the data")
    return header


def read_meta(blob: bytes) -> ChunkMeta:
    """The chunk's ChunkMeta from its header alone, format, version and every field checked;
    tensors and checksum are not read (``decode_chunk`` verifies those). Callers outside the
    codec use this, never the header JSON."""
    metadata = _read_header(blob).get("__metadata__", {})
    _check_version(metadata)
    return _parse_meta(metadata)


def _check_version(metadata: dict) -> None:
    if metadata.get("format") != FORMAT_NAME:
        raise CorruptChunkError(f"not a KV chunk: format is {metadata.get('format')!r}")
    if metadata.get("version") != str(FORMAT_VERSION):
        raise ChunkVersionError(
            f"unsupported chunk format version {metadata.get('version')!r}; this build reads "
            f"{FORMAT_VERSION}. Run `personalkv recache` to re-encode the concept's chunks"
        )


_META_TYPES = {f.name: f.type for f in dataclasses.fields(ChunkMeta)}


def _parse_meta(metadata: dict) -> ChunkMeta:
    """The ChunkMeta of a checksummed header, every field checked for type and range."""
    try:
        fields = json.loads(metadata["meta"])
        meta = ChunkMeta(**fields)
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise CorruptChunkError(f"corrupt chunk: bad metadata ({exc})") from None
    for name, kind in _META_TYPES.items():
        value = getattr(meta, name)
        want = int if kind in ("int", int) else str
        if type(value) is not want:  # bool is an int subclass; refuse it too
            raise CorruptChunkError(f"corrupt chunk: meta.{name} is {value!r}, not an {want.__name__}")
    problems = []
    for name in ("model_fingerprint", "content_hash", "framing"):
        if _HEX64.fullmatch(getattr(meta, name)) is None:
            problems.append(f"{name} is not a sha256 hex digest")
    try:
        validate_user_id(meta.user_id)
        validate_concept_id(meta.concept_id)
    except InvalidIdError as exc:
        problems.append(str(exc))
    if meta.kind not in CHUNK_KINDS:
        problems.append(f"kind {meta.kind!r} is not one of {CHUNK_KINDS}")
    if meta.dtype not in DTYPES:
        problems.append(f"dtype {meta.dtype!r} is not one of {sorted(DTYPES)}")
    if meta.position_axes not in (1, 3):
        problems.append(f"position_axes {meta.position_axes} is not 1 or 3")
    if meta.num_layers < 1 or meta.token_count < 1 or meta.start_position < 0:
        problems.append("num_layers, token_count must be >= 1 and start_position >= 0")
    if meta.position_extent <= meta.start_position:
        problems.append(f"position_extent {meta.position_extent} <= start_position {meta.start_position}")
    if problems:
        raise CorruptChunkError(f"corrupt chunk: {'; '.join(problems)}")
    return meta


def _check_tensors(meta: ChunkMeta, quantization: str, tensors: dict[str, torch.Tensor]) -> None:
    """Names, dtypes and shapes agree with the metadata; positions with start and extent."""
    layers = range(meta.num_layers)
    if quantization == "int8":
        kv_names = {f"{p}.{i}.{part}" for p in "kv" for i in layers for part in ("q", "scale")}
    else:
        kv_names = {f"{p}.{i}" for p in "kv" for i in layers}
    expected = kv_names | {"positions", "token_ids"}
    names = set(tensors)
    optional = {"image_embeds", "salience"}
    if not expected <= names or names - expected - optional:
        missing, extra = sorted(expected - names), sorted(names - expected - optional)
        raise CorruptChunkError(
            f"corrupt chunk: tensors do not match {meta.num_layers} layers / {quantization} "
            f"(missing {missing[:4]}, unexpected {extra[:4]})"
        )
    tokens, dtype = meta.token_count, DTYPES[meta.dtype]

    def fail(what: str) -> None:
        raise CorruptChunkError(f"corrupt chunk: {what}")

    positions, token_ids = tensors["positions"], tensors["token_ids"]
    if positions.dtype != torch.int32 or tuple(positions.shape) != (meta.position_axes, tokens):
        fail(f"positions {positions.dtype} {tuple(positions.shape)}, expected int32 "
             f"({meta.position_axes}, {tokens})")
    if token_ids.dtype != torch.int32 or tuple(token_ids.shape) != (tokens,):
        fail(f"token_ids {token_ids.dtype} {tuple(token_ids.shape)}, expected int32 ({tokens},)")
    first, last = int(positions.min()), int(positions.max())
    if first != meta.start_position or last + 1 != meta.position_extent:
        fail(f"positions span [{first}, {last + 1}) but the header says "
             f"[{meta.start_position}, {meta.position_extent})")
    shape = None
    for name in sorted(kv_names):
        tensor = tensors[name]
        if name.endswith(".scale"):
            want_dtype = torch.float32
        else:
            want_dtype = torch.int8 if quantization == "int8" else dtype
        if tensor.dtype != want_dtype or tensor.dim() != 3:
            fail(f"{name} is {tensor.dtype} with {tensor.dim()} dims, expected 3-d {want_dtype}")
        heads, length, head_dim = tensor.shape
        if length != (1 if name.endswith(".scale") else tokens):
            fail(f"{name} has {length} tokens; the header says {tokens}")
        if shape is None:
            shape = (heads, head_dim)
        elif (heads, head_dim) != shape:
            fail(f"{name} has (heads, head_dim) {(heads, head_dim)}, others {shape}")
    embeds = tensors.get("image_embeds")
    if embeds is not None and (embeds.dim() != 2 or embeds.dtype != dtype or embeds.shape[0] > tokens):
        fail(f"image_embeds {embeds.dtype} {tuple(embeds.shape)}: expected 2-d {dtype} with at "
             f"most {tokens} rows")
    salience = tensors.get("salience")
    if salience is not None and (salience.dtype != torch.float32 or tuple(salience.shape) != (tokens,)
                                 or not bool(torch.isfinite(salience).all()) or bool((salience < 0).any())):
        fail(f"salience {salience.dtype} {tuple(salience.shape)}: expected ({tokens},) finite float32 >= 0")


def decode_chunk(
    blob: bytes,
    *,
    expected_model: str | None = None,
    expected_user: str | None = None,
    expected_chunk_id: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> KVChunk:
    """Bytes -> KVChunk, refusing (with a ChunkFormatError subclass) anything not exactly right.

    ``expected_model``: the fingerprint of the model that will consume the chunk; a chunk computed
    by any other model (or config, weights, dtype) is refused, since its KV would be meaningless.
    ``expected_user`` / ``expected_chunk_id``: the owner and id the caller found the blob under;
    a blob of another user or stored under another chunk's key is refused.
    ``dtype``: cast keys/values (e.g. int8 chunks dequantize to the model's dtype).
    """
    header = _read_header(blob)
    metadata = header.get("__metadata__", {})
    _check_version(metadata)
    meta = _parse_meta(metadata)
    try:
        tensors = st_load(blob)
    except Exception as exc:  # safetensors raises its own error types
        raise CorruptChunkError(f"corrupt chunk: {exc}") from None
    if _checksum(metadata, tensors) != metadata.get("checksum"):
        raise CorruptChunkError("corrupt chunk: checksum mismatch (header or payload changed)")
    if expected_model is not None and meta.model_fingerprint != expected_model:
        raise ChunkModelMismatchError(
            f"chunk was computed by model {meta.model_fingerprint[:16]}, not by the serving model "
            f"{expected_model[:16]}"
        )
    if expected_user is not None and meta.user_id != expected_user:
        raise CorruptChunkError("corrupt chunk: it belongs to another user")
    if expected_chunk_id is not None and meta.content_hash != expected_chunk_id:
        raise CorruptChunkError(
            f"corrupt chunk: stored as {expected_chunk_id[:12]} but its id is {meta.content_hash[:12]}"
        )
    quantization = metadata.get("quantization")
    if quantization not in QUANTIZATIONS:
        raise CorruptChunkError(f"corrupt chunk: unknown quantization {quantization!r}")
    _check_tensors(meta, quantization, tensors)

    target = dtype or DTYPES[meta.dtype]
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
    image_embeds, salience = tensors.get("image_embeds"), tensors.get("salience")
    return KVChunk(
        meta=meta,
        keys=keys,
        values=values,
        positions=tensors["positions"].to(device, torch.int64),
        token_ids=tensors["token_ids"].to(device, torch.int64),
        image_embeds=None if image_embeds is None else image_embeds.to(device, target),
        salience=salience,
    )
