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


def request_generator(options: GenerationOptions) -> torch.Generator | None:
    """The request's own RNG (None when greedy or unseeded): a seeded answer is reproducible,
    alone or in a batch."""
    return torch.Generator().manual_seed(options.seed) if options.seed is not None else None


def take_token(adapter: ModelAdapter, tokens: list[int], token: int, options: GenerationOptions,
               on_token=None) -> bool:
    """Decoding's rule for the next chosen token: an EOS ends the answer and is not kept;
    otherwise it is appended to ``tokens`` and streamed to ``on_token``. Returns whether the
    answer goes on (then the token is fed to the model): not once ``max_new_tokens`` are kept,
    so the last token is never fed (a conversation feeds it at its next turn)."""
    if token in adapter.eos_token_ids:
        return False
    tokens.append(token)
    if on_token is not None:
        on_token(token)
    return len(tokens) < options.max_new_tokens


def decode(
    adapter: ModelAdapter, ctx: PlacedContext, first_logits: torch.Tensor, options: GenerationOptions, on_token=None
) -> list[int]:
    """Generate up to ``max_new_tokens``; each token gets the next explicit position."""
    generator = request_generator(options)
    tokens: list[int] = []
    if options.max_new_tokens < 1:
        return tokens
    logits = first_logits
    while take_token(adapter, tokens, sample_token(logits, options, generator), options, on_token):
        logits = prefill(adapter, ctx, Segment(token_ids=torch.tensor([tokens[-1]])))
    return tokens
