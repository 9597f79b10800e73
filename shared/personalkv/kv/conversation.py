"""A conversation's KV: placed evidence and every turn so far, kept so that a follow-up question
costs only its own tokens.

Layout of the cache (positions ascending, no gaps)::

    [system prefix][evidence chunks of turn 1][question 1][answer 1]
    [end of answer / start of the user's turn][evidence new in turn 2][question 2][answer 2] ...

Turn 1 is exactly the single-turn Ask (``engine.answer`` runs it this way): the chunks are placed
behind the system prefix (``place_chunks``), a share is recomputed, the question is prefilled
and the answer decoded. A follow-up feeds what the cache still lacks of the previous answer (its
last token when the answer stopped at ``max_new_tokens``: decoding never feeds the token it
ends on) and the template's turn separator (``ModelAdapter.next_turn_text``), in the question's
own forward when the turn brings no evidence (a follow-up then costs one forward, no placement
work); evidence new in this turn is appended after them at the next free positions (its keys
rotated there, like any placement) and its own tokens are recomputed against everything before
it (the earlier turns are context it never saw), then the question is prefilled and the answer
decoded. Evidence already
in the conversation is never placed twice, and nothing placed before is moved: the history is a
stable prefix.

``ConversationKV.replay`` rebuilds the same cache from a turn record (chunks, question, photo,
answer token ids) with the same operations in the same order, except that each recorded answer
is prefilled in one forward rather than fed a token at a time (the same keys and values up to
float rounding, at a fraction of the cost), so a conversation continues on any process: greedy
decoding from a rebuilt cache gives the answer the kept one gives (tests, |dlogit| <= 1e-4).
"""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from personalkv.kv.chunk import KVChunk
from personalkv.kv.generation import AnswerResult, GenerationOptions, decode, prefill
from personalkv.kv.placement import PlacedChunk, PlacedContext, chunk_offsets, place_chunks
from personalkv.kv.recompute import recompute
from personalkv.kv.rope import shift_keys
from personalkv.models.base import ModelAdapter, Segment


@dataclass
class ConversationKV:
    """A conversation's live cache (see the module docstring). Not thread-safe: one turn at a
    time (the service layer serialises a conversation's turns)."""

    #: the cache and its bookkeeping; None before the first turn
    ctx: PlacedContext | None = None
    turns: int = 0
    #: generated tokens the cache does not hold yet (fed at the start of the next turn)
    pending: list[int] = field(default_factory=list)
    #: chunk ids placed so far, in order
    evidence: list[str] = field(default_factory=list)

    @property
    def kv_tokens(self) -> int:
        """Tokens in the cache (what the model's context window bounds)."""
        return 0 if self.ctx is None else self.ctx.kv_length

    def nbytes(self) -> int:
        """Bytes of the cache's keys and values."""
        return 0 if self.ctx is None else ModelAdapter.cache_nbytes(self.ctx.cache)

    def turn(self, adapter: ModelAdapter, chunks: Sequence[KVChunk], question: str,
             image: Image.Image | None = None, *, options: GenerationOptions, on_token=None,
             answer_ids: Sequence[int] | None = None) -> AnswerResult:
        """Answer one question: ``chunks`` are this turn's new evidence (already placed ones are
        skipped), ``options`` the engine's ``GenerationOptions``. With ``answer_ids`` (a replay)
        the answer is not generated: those tokens are fed as the decode loop fed them."""
        started = self.begin_turn(adapter, chunks, question, image, options=options)
        t0 = time.perf_counter()
        with torch.inference_mode():
            if answer_ids is None:
                tokens = decode(adapter, self.ctx, started.logits, options, on_token)
            else:
                tokens = list(answer_ids)
                fed = tokens[:-1] if len(tokens) == options.max_new_tokens else tokens
                if fed:  # one forward for the whole answer: the same KV up to float rounding
                    prefill(adapter, self.ctx, Segment(token_ids=torch.tensor(fed)))
        started.timings["decode"] = time.perf_counter() - t0
        return self.end_turn(adapter, started, tokens, options)

    def begin_turn(self, adapter: ModelAdapter, chunks: Sequence[KVChunk], question: str,
                   image: Image.Image | None = None, *, options: GenerationOptions) -> TurnStart:
        """The turn up to its first logits: place (or append) the new evidence, recompute, and
        prefill the question. The answer is then decoded from ``self.ctx`` (alone, ``decode``,
        or in a batch, ``engine.batch``) and handed to ``end_turn``."""
        steps = self.begin_turn_steps(adapter, chunks, question, image, options=options)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def begin_turn_steps(self, adapter: ModelAdapter, chunks: Sequence[KVChunk], question: str,
                         image: Image.Image | None = None, *, options: GenerationOptions,
                         piece_tokens: int = 0) -> Generator[None, None, TurnStart]:
        """``begin_turn`` in pieces (chunked prefill): a generator that does the placement, the
        recompute's selection and the first ``piece_tokens`` of the question's forward (which
        the pending recompute rides in), then yields; each resumption feeds the next piece; it
        returns the ``TurnStart``. A scheduler interleaves the pieces with other requests'
        decode steps, so a joining request never stalls them for its whole prefill. A causal
        forward in pieces gives the KV of one forward up to float rounding. ``piece_tokens`` 0,
        or a question with a photo (an image's tokens go in one forward), is one piece."""
        if self.turns and self.ctx is None:
            raise ValueError("a conversation's cache was dropped")
        chunks = [c for c in chunks if c.chunk_id not in self.evidence]
        with torch.inference_mode():  # not held across a yield: the caller's thread goes on
            t0 = time.perf_counter()
            lead: list[int] = []  # tokens fed in the question's forward, before the question
            if self.turns == 0:
                self.ctx = place_chunks(adapter, list(chunks))
                placed = self.ctx
            else:
                between = [*self.pending, *adapter.tokenize(adapter.next_turn_text)]
                if chunks:  # the new evidence goes after the separator: feed it first
                    prefill(adapter, self.ctx, Segment(token_ids=torch.tensor(between)))
                    placed = append_chunks(adapter, self.ctx, list(chunks))
                else:  # nothing to place: the separator rides in the question's forward
                    lead, placed = between, None
            self.pending = []
            t1 = time.perf_counter()
            question_segment = adapter.build_segment(adapter.question_parts(question))
            recomputed = 0 if placed is None else recompute(
                adapter, placed, options.recompute_ratio, options.recompute_strategy, question=question_segment)
            t2 = time.perf_counter()
            photo = adapter.encode_image(image) if image is not None else None
            segment = question_segment if photo is None else \
                adapter.build_segment(adapter.question_parts(question, photo))
            if lead:
                segment = Segment(token_ids=torch.cat([torch.tensor(lead, dtype=segment.token_ids.dtype),
                                                       segment.token_ids]), images=segment.images)
        size = piece_tokens if piece_tokens > 0 and not segment.images else segment.num_tokens
        ids, forward_s = segment.token_ids, 0.0
        for at in range(0, max(1, segment.num_tokens), size):
            if at:
                yield
            piece = segment if size >= segment.num_tokens else Segment(token_ids=ids[at:at + size])
            started = time.perf_counter()
            with torch.inference_mode():
                logits = prefill(adapter, self.ctx, piece)
            forward_s += time.perf_counter() - started
        return TurnStart(logits=logits, new_evidence=[c.chunk_id for c in chunks],
                         recomputed_tokens=recomputed,
                         timings={"place": t1 - t0, "recompute": t2 - t1, "prefill": forward_s})

    def end_turn(self, adapter: ModelAdapter, started: TurnStart, tokens: list[int],
                 options: GenerationOptions) -> AnswerResult:
        """Close the turn whose answer ``tokens`` the cache now holds (all but the one decoding
        stopped on at ``max_new_tokens``: it opens the next turn; an EOS is never appended)."""
        self.pending = tokens[-1:] if len(tokens) == options.max_new_tokens else []
        self.evidence += started.new_evidence
        self.turns += 1
        text = adapter.tokenizer.decode(tokens, skip_special_tokens=True)
        return AnswerResult(text=text, token_ids=tokens, first_logits=started.logits,
                            recomputed_tokens=started.recomputed_tokens, timings=started.timings)


@dataclass
class TurnStart:
    """A turn between ``begin_turn`` and ``end_turn``: the question's next-token logits."""

    logits: torch.Tensor
    new_evidence: list[str]
    recomputed_tokens: int
    #: seconds per stage so far (place, recompute, prefill); the decoder adds "decode"
    timings: dict[str, float]


def append_chunks(adapter: ModelAdapter, ctx: PlacedContext, chunks: list[KVChunk]) -> PlacedContext:
    """Lay ``chunks`` at ``ctx``'s next free positions (keys rotated there, values copied),
    extending its cache in place; returns a view for ``recompute`` in which everything before
    the new chunks is context (``prefix_tokens``) and the new chunks are the placed ones."""
    before = ctx.kv_length
    if not chunks:
        return PlacedContext(cache=ctx.cache, prefix_tokens=before, next_position=ctx.next_position)
    prefix = adapter.system_prefix()
    for chunk in chunks:
        if chunk.meta.framing != prefix.framing:
            raise ValueError(f"chunk {chunk.chunk_id[:12]} was computed after a different system prefix")
    offsets = chunk_offsets(ctx.next_position, chunks)
    placed, cursor = [], before
    for chunk, start in zip(chunks, offsets):
        delta = start - chunk.meta.start_position
        placed.append(PlacedChunk(chunk=chunk, kv_start=cursor, positions=chunk.positions + delta, delta=delta))
        cursor += chunk.meta.token_count
    for layer in range(adapter.num_layers):
        old_k, old_v = adapter.cache_kv(ctx.cache, layer)
        keys = old_k.new_empty(1, old_k.shape[1], cursor, old_k.shape[-1])
        values = old_v.new_empty(1, old_v.shape[1], cursor, old_v.shape[-1])
        keys[..., :before, :] = old_k
        values[..., :before, :] = old_v
        for p in placed:
            shift_keys(p.chunk.keys[layer].to(keys.device), p.delta, adapter.layer_inv_freq(layer),
                       out=keys[0, :, p.kv_start:p.kv_end, :])
            values[0, :, p.kv_start:p.kv_end, :] = p.chunk.values[layer]
        adapter.set_cache_kv(ctx.cache, layer, keys, values)
    ctx.next_position = offsets[-1] + chunks[-1].meta.position_span
    ctx.placed += placed
    return PlacedContext(cache=ctx.cache, prefix_tokens=before, next_position=ctx.next_position,
                         placed=placed, pending_recompute=ctx.pending_recompute)
