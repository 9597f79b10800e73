"""Generation primitives shared by the single-turn and the conversation paths: the options,
the result of one answer, prefilling a segment at the next free position, and the decode loop
(explicit positions for every generated token)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from personalkv.kv.placement import PlacedContext
from personalkv.kv.recompute import run_with_pending_recompute
from personalkv.models.base import ModelAdapter, Segment


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
    """Feed a segment at ``ctx.next_position``; returns the last token's logits ``(vocab,)``.
    A selective recompute pending on ``ctx`` runs in the same forward (``kv.recompute``)."""
    positions, extent = adapter.segment_positions(segment, ctx.next_position)
    embeds = adapter.embed(segment.token_ids, segment.image_embeds())
    if ctx.pending_recompute:
        hidden = run_with_pending_recompute(adapter, ctx, embeds, positions)
    else:
        hidden = adapter.run_decoder(embeds, positions, ctx.cache)
    ctx.next_position = extent
    return adapter.logits(hidden[:, -1:])[0, -1]


def sample_token(logits: torch.Tensor, options: GenerationOptions, generator: torch.Generator | None) -> int:
    """The next token from ``(vocab,)`` logits: argmax when greedy, else temperature / top-p
    sampling from ``generator`` (one per request: a seeded answer is reproducible)."""
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
        token = sample_token(logits, options, generator)
        if token in adapter.eos_token_ids:
            break
        tokens.append(token)
        if on_token is not None:
            on_token(token)
        if len(tokens) == options.max_new_tokens:
            break
        logits = prefill(adapter, ctx, Segment(token_ids=torch.tensor([token])))
    return tokens
