"""Model-agnostic encode and answer loops over a ``ModelAdapter``.

``encode_evidence``: one piece of evidence -> KVChunk, in the canonical framing (after the
system prefix, at the prefix's extent, attending to the prefix and itself).
``answer``: placed chunks + question (+ optional photo) -> generated text, with explicit
positions for the question and every generated token, and a per-stage timing breakdown.
All per-request state (cache, positions, RNG) is local to the call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from PIL import Image

from personalkv.kv.chunk import ChunkKind, ChunkMeta, KVChunk
from personalkv.kv.evidence import Evidence, chunk_id_of
from personalkv.kv.placement import PlacedContext, place_chunks
from personalkv.kv.recompute import recompute
from personalkv.models.base import ImageInput, ModelAdapter, Segment


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
    return KVChunk(
        meta=meta,
        keys=keys,
        values=values,
        positions=positions.cpu(),
        token_ids=segment.token_ids.cpu(),
        image_embeds=None if image_embeds is None else image_embeds.detach().clone(),
    )


def encode(adapter: ModelAdapter, evidence: Evidence, *, user_id: str, concept_id: str) -> KVChunk:
    return encode_evidence(
        adapter, evidence.parts(adapter), user_id=user_id, concept_id=concept_id,
        kind=evidence.kind, content=evidence.content, source=evidence.source,
    )


@dataclass
class GenerationOptions:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    recompute_ratio: float = 0.0
    recompute_strategy: str = "deviation"


@dataclass
class AnswerResult:
    text: str
    token_ids: list[int]
    first_logits: torch.Tensor  # next-token logits after the question (vocab,)
    recomputed_tokens: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage


def prefill(adapter: ModelAdapter, ctx: PlacedContext, segment: Segment) -> torch.Tensor:
    """Feed a segment at ``ctx.next_position``; returns the last token's logits ``(vocab,)``."""
    positions, extent = adapter.segment_positions(segment, ctx.next_position)
    hidden = adapter.run_decoder(adapter.embed(segment.token_ids, segment.image_embeds()), positions, ctx.cache)
    ctx.next_position = extent
    return adapter.logits(hidden[:, -1:])[0, -1]


def _sample(logits: torch.Tensor, options: GenerationOptions, generator: torch.Generator | None) -> int:
    if options.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / options.temperature, dim=-1)
    if options.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < options.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def decode(
    adapter: ModelAdapter, ctx: PlacedContext, first_logits: torch.Tensor, options: GenerationOptions, on_token=None
) -> list[int]:
    """Generate up to ``max_new_tokens``; each token gets the next explicit position."""
    generator = torch.Generator().manual_seed(options.seed) if options.seed is not None else None
    tokens: list[int] = []
    logits = first_logits
    for _ in range(options.max_new_tokens):
        token = _sample(logits, options, generator)
        if token in adapter.eos_token_ids:
            break
        tokens.append(token)
        if on_token is not None:
            on_token(token)
        if len(tokens) == options.max_new_tokens:
            break
        logits = prefill(adapter, ctx, Segment(token_ids=torch.tensor([token])))
    return tokens


def answer(
    adapter: ModelAdapter,
    chunks: Sequence[KVChunk],
    question: str,
    image: Image.Image | None = None,
    options: GenerationOptions | None = None,
    on_token=None,
) -> AnswerResult:
    """Place ``chunks`` (in order) behind the system prefix, then answer ``question``."""
    options = options or GenerationOptions()
    timings: dict[str, float] = {}
    with torch.inference_mode():
        t0 = time.perf_counter()
        ctx = place_chunks(adapter, list(chunks))
        t1 = time.perf_counter()
        recomputed = recompute(adapter, ctx, options.recompute_ratio, options.recompute_strategy)
        t2 = time.perf_counter()
        photo = adapter.encode_image(image) if image is not None else None
        logits = prefill(adapter, ctx, adapter.build_segment(adapter.question_parts(question, photo)))
        t3 = time.perf_counter()
        tokens = decode(adapter, ctx, logits, options, on_token)
        t4 = time.perf_counter()
    timings.update(place=t1 - t0, recompute=t2 - t1, prefill=t3 - t2, decode=t4 - t3)
    text = adapter.tokenizer.decode(tokens, skip_special_tokens=True)
    return AnswerResult(text=text, token_ids=tokens, first_logits=logits, recomputed_tokens=recomputed, timings=timings)
