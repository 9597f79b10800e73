"""The scheduler's policy, as plain functions over numbers: which waiting requests join the
batch now (``admissible``) and what one engine step does (``plan_step`` -> ``StepPlan``, which
``engine.runner`` executes). No model, no tensors: ``tests/unit/engine/test_policy.py`` tests it
alone, and ``test_scheduler_policy.py`` drives the scheduler with a fake runner.

A request is counted by the KV tokens its row holds when its answer is complete (its "need":
history or system prefix, evidence, question, ``max_new_tokens``). Requests join oldest first
while the batch has a free row, the tokens in flight stay within ``max_tokens_in_flight`` and
the bytes at the re-layout's peak within the KV budget (``engine.memory``). A request alone
in an empty batch always joins unless it can never fit (refused before it queues).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from personalkv.engine.memory import admission_peak_bytes


@dataclass(frozen=True)
class AdmissionLimits:
    max_batch: int
    max_tokens_in_flight: int
    kv_bytes_per_token: int
    kv_budget_bytes: int

    def fits(self, in_flight: Sequence[int], need: int) -> bool:
        """Whether a request needing ``need`` tokens fits beside ``in_flight`` (their needs)."""
        return (sum(in_flight) + need <= self.max_tokens_in_flight
                and admission_peak_bytes(in_flight, need, self.kv_bytes_per_token) <= self.kv_budget_bytes)

    def never_fits(self, need: int) -> bool:
        """Whether a request needing ``need`` tokens could not run even alone."""
        return not self.fits([], need)


def admissible(in_flight: Sequence[int], waiting: Iterable[int], limits: AdmissionLimits) -> int:
    """How many of ``waiting`` (their needs, oldest first; read lazily, only as far as
    needed) join a batch whose rows (decoding or being prefilled) need ``in_flight``."""
    rows, joined = list(in_flight), 0
    for need in waiting:
        if len(rows) >= limits.max_batch or (rows and not limits.fits(rows, need)):
            break
        rows.append(need)
        joined += 1
    return joined


# --- the step plan ---------------------------------------------------------------------------
class Phase(enum.Enum):
    """Where a request is in the engine."""

    WAITING = "waiting"        # queued, no model work yet
    PREFILLING = "prefilling"  # its evidence and question are being read, in pieces
    DECODING = "decoding"      # it has a row in the decode batch


class EndReason(enum.Enum):
    CANCELLED = "cancelled"  # its caller went away (or stopped waiting)
    EXPIRED = "expired"      # its deadline passed


@dataclass(frozen=True)
class RequestView:
    """What the plan sees of one request: numbers and flags, no tensors."""

    key: int  # the scheduler's handle for it
    phase: Phase
    need: int  # KV tokens its row holds when its answer is complete
    end: EndReason | None = None  # set when nobody waits for its answer any more


#: ``StepPlan.prefill``: run this request's prefill to its end in this step
TO_THE_END = 0


@dataclass(frozen=True)
class StepPlan:
    """One engine step, decided before any model work (as vLLM v1's ``SchedulerOutput``):

    1. ``end``: requests that end now, before anything is spent on them;
    2. ``admit``: waiting requests whose prefill starts in this step;
    3. ``prefill``: ``(request, pieces)`` in order, ``TO_THE_END`` for all of it; a request
       that finishes its prefill takes its first token and a row (it decodes from the next step);
    4. ``decode``: the rows that advance one token, in one batched forward.
    """

    end: tuple[tuple[int, EndReason], ...] = ()
    admit: tuple[int, ...] = ()
    prefill: tuple[tuple[int, int], ...] = ()
    decode: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.end or self.admit or self.prefill or self.decode)


def plan_step(requests: Sequence[RequestView], limits: AdmissionLimits, prefill_pieces: int = 0) -> StepPlan:
    """The next step for ``requests`` (waiting ones oldest first).

    Requests nobody waits for end first. Waiting ones join while they fit (``admissible``).
    Chunked prefill: while rows decode, the ``prefill_pieces`` oldest joining requests advance
    one piece each per step (0: every joining request), so the running rows wait at most that
    many pieces between two tokens; but when the joining requests outnumber the decoding rows
    (a burst of new Asks), as many more advance as they outnumber them: most of the batch
    then waits for a first token, and a step spent on the few decoding rows delays them all
    (docs/architecture.md has the measurements). With nothing decoding, the oldest prefill runs
    to its end (its first token comes as early as it can) and the others advance a piece."""
    end = tuple((r.key, r.end) for r in requests if r.end is not None)
    live = [r for r in requests if r.end is None]
    decoding = [r for r in live if r.phase is Phase.DECODING]
    prefilling = [r for r in live if r.phase is Phase.PREFILLING]
    waiting = [r for r in live if r.phase is Phase.WAITING]
    count = admissible([r.need for r in decoding + prefilling], (r.need for r in waiting), limits)
    admitted = waiting[:count]
    reading = prefilling + admitted
    if decoding:
        advancing = max(prefill_pieces, len(reading) - len(decoding)) if prefill_pieces else len(reading)
        prefill = tuple((r.key, 1) for r in reading[:advancing])
    else:
        prefill = tuple((r.key, TO_THE_END if i == 0 else 1) for i, r in enumerate(reading))
    return StepPlan(end=end, admit=tuple(r.key for r in admitted), prefill=prefill,
                    decode=tuple(r.key for r in decoding))
