"""``ChunkRef``: the one pointer to a stored KV chunk blob.

The same value travels the whole way: the caching pipeline builds it when it stores a chunk
(``service_layer.pipeline``), the concept manifest persists it (``ConceptManifest.chunks``),
``retrieval.keys`` puts it on the index entry of the chunk's key (``IndexEntry.chunk``), the
index returns it on the hit (``SearchHit.chunk``) and the retriever hands it to the answering
path, which loads the blob by ``object_key`` and places ``position_span`` positions.

A module of its own so that both ``personalkv.manifest`` and ``personalkv.index`` can use it:
the index knows nothing of concepts and manifests.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from personalkv.ids import validate_hex_digest


class ChunkRef(BaseModel):
    """One KV chunk blob: its content hash, where it lies and what produced it. Immutable."""

    # forbid: a misspelt field is a bug, not data to carry along silently (as in the manifest).
    model_config = ConfigDict(extra="forbid", frozen=True)

    chunk_id: str = Field(description="sha256 hex content hash of the KV chunk.")
    kind: Literal["profile_text", "image_patch"]
    object_key: str
    token_count: int = Field(ge=0)
    position_span: int = Field(ge=0, description=(
        "RoPE positions the chunk spans when placed (ChunkMeta.position_span: its next free "
        "position minus its start)."))
    model_fingerprint: str
    source: str = Field(description='"profile" or the index of the patch it encodes.')

    _check_id = field_validator("chunk_id")(lambda v: validate_hex_digest(v, "chunk id"))

    @model_validator(mode="before")
    @classmethod
    def _read_old_span_name(cls, data):
        # Manifests written before issue 11 stored the span as "position_extent", a name that
        # means "next free position" in ChunkMeta. Same value, new name; rewritten on save.
        if isinstance(data, dict) and "position_extent" in data and "position_span" not in data:
            data = {("position_span" if k == "position_extent" else k): v for k, v in data.items()}
        return data
