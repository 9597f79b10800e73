"""Model-agnostic encode and answer loops over a ``ModelAdapter``.

``encode_evidence``: one piece of evidence -> KVChunk, in the canonical framing (after the
system prefix, at the prefix's extent, attending to the prefix and itself).
``answer``: placed chunks + question (+ optional photo) -> generated text, with explicit
positions for the question and every generated token, and a per-stage timing breakdown: the
first turn of a ``kv.conversation.ConversationKV`` nobody keeps. The generation primitives
(``GenerationOptions``, ``prefill``, ``decode``) live in ``kv.generation``.
All per-request state (cache, positions, RNG) is local to the call.
"""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

from personalkv.kv.chunk import ChunkKind, ChunkMeta, KVChunk
from personalkv.kv.conversation import ConversationKV
from personalkv.kv.evidence import Evidence, chunk_id_of
from personalkv.kv.generation import AnswerResult, GenerationOptions, decode, prefill
from personalkv.kv.recompute import chunk_salience
from personalkv.models.base import ImageInput, ModelAdapter


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def encode_evidence(
    adapter: ModelAdapter,
    parts: Sequence[str | ImageInput],
    *,
    user_id: str,
    concept_id: str,
    kind: ChunkKind,
    content: bytes,
    source: str = "",
) -> KVChunk:
    """Run the model once over ``parts`` after the system prefix and keep the parts' KV.

    ``content`` is what the chunk is *of* (profile text bytes, the patch's image bytes plus its
    framing text): it goes into the content hash with the model, framing and owner.
    """
    prefix = adapter.system_prefix()
    segment = adapter.build_segment(parts)
    image_embeds = segment.image_embeds()
    with torch.inference_mode():
        positions, extent = adapter.segment_positions(segment, prefix.extent)
        cache = adapter.new_cache(list(zip(prefix.keys, prefix.values)))
        adapter.run_decoder(adapter.embed(segment.token_ids, image_embeds), positions, cache)
        start = prefix.num_tokens
        kv = [adapter.cache_kv(cache, layer) for layer in range(adapter.num_layers)]
        keys = [k[0, :, start:, :].clone() for k, _ in kv]
        values = [v[0, :, start:, :].clone() for _, v in kv]
    fingerprint = adapter.fingerprint()
    meta = ChunkMeta(
        model_fingerprint=fingerprint,
        user_id=user_id,
        concept_id=concept_id,
        kind=kind,
        content_hash=chunk_id_of(adapter, user_id, concept_id, kind, content),
        token_count=segment.num_tokens,
        start_position=prefix.extent,
        position_extent=extent,
        num_layers=adapter.num_layers,
        dtype=_dtype_name(adapter.dtype),
        position_axes=adapter.position_axes,
        framing=prefix.framing,
        source=source,
    )
    chunk = KVChunk(
        meta=meta,
        keys=keys,
        values=values,
        positions=positions.cpu(),
        token_ids=segment.token_ids.cpu(),
        image_embeds=None if image_embeds is None else image_embeds.detach().clone(),
    )
    # What a question reads of the chunk, measured once here so that an Ask need not probe.
    chunk.salience = chunk_salience(adapter, chunk)
    return chunk


def encode(adapter: ModelAdapter, evidence: Evidence, *, user_id: str, concept_id: str) -> KVChunk:
    return encode_evidence(
        adapter, evidence.parts(adapter), user_id=user_id, concept_id=concept_id,
        kind=evidence.kind, content=evidence.content, source=evidence.source,
    )


def answer(
    adapter: ModelAdapter,
    chunks: Sequence[KVChunk],
    question: str,
    image: Image.Image | None = None,
    options: GenerationOptions | None = None,
    on_token=None,
) -> AnswerResult:
    """Place ``chunks`` (in order) behind the system prefix, then answer ``question``: the
    first turn of a conversation whose KV nobody keeps (``kv.conversation``)."""
    return ConversationKV().turn(adapter, chunks, question, image,
                                 options=options or GenerationOptions(), on_token=on_token)


__all__ = ["AnswerResult", "GenerationOptions", "answer", "decode", "encode", "encode_evidence",
           "prefill"]
