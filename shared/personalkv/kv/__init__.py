"""KV chunks: the format (chunk), its bytes (codec), RoPE bookkeeping (rope), placement of
several chunks behind a system prefix (placement), selective recompute (recompute), and the
model-agnostic encode / answer loops (engine)."""

from personalkv.kv.chunk import ChunkKind, ChunkMeta, KVChunk, chunk_content_hash
from personalkv.kv.codec import (
    ChunkFormatError,
    ChunkModelMismatchError,
    ChunkVersionError,
    CorruptChunkError,
    TruncatedChunkError,
    decode_chunk,
    encode_chunk,
)

__all__ = [
    "ChunkFormatError",
    "ChunkKind",
    "ChunkMeta",
    "ChunkModelMismatchError",
    "ChunkVersionError",
    "CorruptChunkError",
    "KVChunk",
    "TruncatedChunkError",
    "chunk_content_hash",
    "decode_chunk",
    "encode_chunk",
]
