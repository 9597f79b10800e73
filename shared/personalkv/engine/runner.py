"""The model runner: the only part of the engine that touches the model.

The scheduler decides each step as a plain ``engine.policy.StepPlan`` (which requests end, join,
read a piece of their prefill, decode) and calls the runner to carry it out, as vLLM v1 splits
its ``Scheduler`` from its ``GPUModelRunner``. The split is what lets the policy and its failure
handling be tested without a model: ``tests/unit/engine/test_scheduler_policy.py`` drives the
real scheduler with a fake runner that has this interface.

``ModelRunner`` is the real one: one model (``ModelAdapter``) and its decode batch
(``engine.batch.DecodeBatch``); a request's prefill is ``ConversationKV.begin_turn_steps``
(placement, selective recompute, the question in pieces) and its end ``end_turn``.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Protocol

import torch

from personalkv.engine.batch import BatchRow, DecodeBatch
from personalkv.engine.job import ModelJob
from personalkv.engine.memory import auto_budget_bytes, kv_bytes_per_token
from personalkv.kv.conversation import TurnStart
from personalkv.kv.generation import AnswerResult, GenerationOptions, take_token
from personalkv.models.base import ModelAdapter

#: tokens counted for the chat framing around a question, and for a photo in it, before they
#: are known (admission estimates a request's KV before its prefill)
FRAMING_TOKENS, PHOTO_TOKENS = 32, 1024


class Runner(Protocol):
    """What the scheduler asks of the model (module docstring). Called from one thread."""

    #: the model it runs (the scheduler makes a new runner when the process's model changes)
    adapter: object

    def kv_bytes_per_token(self) -> int: ...
    def auto_budget_bytes(self) -> int: ...
    def need(self, job: ModelJob) -> int: ...
    def prefill(self, job: ModelJob, piece_tokens: int) -> Generator[None, None, TurnStart]: ...
    def join(self, job: ModelJob, first_token: int) -> BatchRow: ...
    def decode(self) -> tuple[Sequence[BatchRow], torch.Tensor]: ...
    def take_token(self, tokens: list[int], token: int, options: GenerationOptions, on_token) -> bool: ...
    def leave(self, row: BatchRow, keep: bool) -> None: ...
    def end_turn(self, job: ModelJob, started: TurnStart, tokens: list[int]) -> AnswerResult: ...
    def reset(self) -> None: ...


class ModelRunner:
    """Runs one ``ModelAdapter`` for the scheduler (module docstring)."""

    def __init__(self, adapter: ModelAdapter):
        self.adapter = adapter
        self.batch = DecodeBatch(adapter)
        self._per_token: int | None = None

    def kv_bytes_per_token(self) -> int:
        if self._per_token is None:
            self._per_token = kv_bytes_per_token(self.adapter)
        return self._per_token

    def auto_budget_bytes(self) -> int:
        return auto_budget_bytes(self.adapter.device)

    def need(self, job: ModelJob) -> int:
        """KV tokens ``job``'s row holds when its answer is complete (an estimate before the
        question is framed: ``FRAMING_TOKENS``, ``PHOTO_TOKENS``)."""
        adapter = self.adapter
        before = job.state.kv_tokens if job.state.ctx is not None else adapter.system_prefix().num_tokens
        return (before + sum(c.meta.token_count for c in job.chunks) + len(adapter.tokenize(job.question))
                + FRAMING_TOKENS + (PHOTO_TOKENS if job.image is not None else 0)
                + job.options.max_new_tokens)

    def prefill(self, job: ModelJob, piece_tokens: int) -> Generator[None, None, TurnStart]:
        return job.state.begin_turn_steps(self.adapter, job.chunks, job.question, job.image,
                                          options=job.options, piece_tokens=piece_tokens)

    def join(self, job: ModelJob, first_token: int) -> BatchRow:
        return self.batch.join(job.state.ctx, first_token)

    def decode(self) -> tuple[Sequence[BatchRow], torch.Tensor]:
        """One token for every row: (the rows, in the order of) their ``(B, vocab)`` logits."""
        rows = list(self.batch.rows)
        with torch.inference_mode():
            return rows, self.batch.step()

    def take_token(self, tokens: list[int], token: int, options: GenerationOptions, on_token) -> bool:
        return take_token(self.adapter, tokens, token, options, on_token)

    def leave(self, row: BatchRow, keep: bool) -> None:
        self.batch.leave(row, keep=keep)

    def end_turn(self, job: ModelJob, started: TurnStart, tokens: list[int]) -> AnswerResult:
        return job.state.end_turn(self.adapter, started, tokens, job.options)

    def reset(self) -> None:
        """A fresh decode batch: the rows of a failed forward are gone with the old one."""
        self.batch = DecodeBatch(self.adapter)
