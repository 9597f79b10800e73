"""The KV chunk: keys and values of every layer for one piece of evidence.

Canonical framing (the same for every chunk of a model): the chunk is computed right after the
model's fixed system prefix (``ModelAdapter.system_prefix``), starting at the prefix's position
extent, attending to the prefix and to itself only. Its keys are stored *with* RoPE applied at
those canonical positions; placement (``personalkv.kv.placement``) rotates them to wherever the
chunk lands in a request. Values carry no position and are stored as computed.

Positions are an ``(axes, tokens)`` tensor: one axis for 1-D RoPE, three (temporal, height,
width) for Qwen2-VL's M-RoPE, where an image's tokens share positions and the next free position
(``position_extent``) is not ``start + token_count``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

import torch

ChunkKind = Literal["profile_text", "image_patch"]
CHUNK_KINDS: tuple[str, ...] = ("profile_text", "image_patch")

#: Version of the chunk's byte format (``personalkv.kv.codec``). It is part of every chunk id
#: (``chunk_content_hash``), so after a format change ``personalkv recache`` gives every chunk a
#: new id and key, encodes it in the new format and deletes the old blob.
CHUNK_FORMAT_VERSION = 2


@dataclass(frozen=True)
class ChunkMeta:
    """Everything about a chunk except its tensors. Serialized as JSON in the blob header."""

    model_fingerprint: str
    user_id: str
    concept_id: str
    kind: ChunkKind
    content_hash: str  # sha256 hex; also the chunk id
    token_count: int
    start_position: int  # first canonical position (= the system prefix's extent)
    position_extent: int  # next free canonical position after the chunk
    num_layers: int
    dtype: str  # torch dtype name of keys/values when computed, e.g. "float32", "bfloat16"
    position_axes: int  # 1 (RoPE) or 3 (M-RoPE)
    framing: str  # sha256 of the system prefix text the chunk was computed after
    source: str = ""  # free text: "profile", "patch:3", ...

    @property
    def chunk_id(self) -> str:
        return self.content_hash

    @property
    def position_span(self) -> int:
        """How far this chunk advances the position counter when placed."""
        return self.position_extent - self.start_position


@dataclass
class KVChunk:
    """One piece of evidence, encoded. Tensors drop the batch dimension.

    keys[i], values[i]: ``(kv_heads, tokens, head_dim)`` for layer i (keys RoPE'd at ``positions``).
    positions: ``(axes, tokens)`` int64 canonical positions.
    token_ids: ``(tokens,)`` int64, needed to re-embed tokens for selective recompute.
    image_embeds: ``(n_image_tokens, hidden)`` rows for the image placeholder tokens, in order;
        ``None`` for text chunks. Kept so that recompute never has to re-run the vision tower.
    salience: ``(tokens,)`` float32, how much a question about the chunk reads each of its
        tokens, measured once when the chunk is computed (``kv.recompute.chunk_salience``): the
        ``salience`` recompute strategy ranks stale tokens by it instead of probing the question
        at Ask time. ``None`` for chunks stored before it existed (then measured on first use).
    """

    meta: ChunkMeta
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    positions: torch.Tensor
    token_ids: torch.Tensor
    image_embeds: torch.Tensor | None = None
    salience: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.keys) != len(self.values) or len(self.keys) != self.meta.num_layers:
            raise ValueError("keys/values must hold one tensor per layer")
        if self.positions.shape != (self.meta.position_axes, self.meta.token_count):
            raise ValueError(
                f"positions shape {tuple(self.positions.shape)} does not match "
                f"({self.meta.position_axes}, {self.meta.token_count})"
            )

    @property
    def chunk_id(self) -> str:
        return self.meta.content_hash

    def nbytes(self) -> int:
        tensors = [*self.keys, *self.values, self.positions, self.token_ids]
        if self.image_embeds is not None:
            tensors.append(self.image_embeds)
        if self.salience is not None:
            tensors.append(self.salience)
        return sum(t.numel() * t.element_size() for t in tensors)


def chunk_content_hash(
    *, model_fingerprint: str, framing: str, user_id: str, concept_id: str, kind: str, content: bytes
) -> str:
    """sha256 over everything that determines the chunk's tensors and its owner.

    The user and concept are part of the hash so that two users (or two concepts) with identical
    photos never share a chunk id, an object key or an index entry; the format version is, so
    that a chunk in an older byte format is never taken for the current one.
    """
    digest = hashlib.sha256()
    digest.update(f"personalkv.kvchunk.v{CHUNK_FORMAT_VERSION}".encode())
    for part in (model_fingerprint, framing, user_id, concept_id, kind):
        encoded = part.encode()
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    digest.update(len(content).to_bytes(8, "little"))
    digest.update(content)
    return digest.hexdigest()
