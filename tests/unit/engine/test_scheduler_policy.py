"""The real ``BatchScheduler`` driven through a fake runner (``engine.runner.Runner``): its
policy and failure handling without a model. The fake's "model" answers each request with
``first, first + 1, ...`` and logs every piece of prefill and every batched forward, so that
the tests see what ran in which step.

No timing is asserted: the waits are bounded only so that a broken scheduler fails the test
instead of hanging it (generous, for a loaded machine)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from personalkv.engine.batch import BatchRow
from personalkv.engine.scheduler import BatchScheduler, ModelJob
from personalkv.errors import CallEnded, DeadlineExceeded, Internal
from personalkv.kv.conversation import TurnStart
from personalkv.kv.generation import AnswerResult, GenerationOptions

VOCAB, EOS = 64, 63
WAIT_S = 60


class FakeRunner:
    """A request's question names its script: ``"<first token>:<prefill pieces>[:fail-at]"``."""

    def __init__(self, adapter):
        self.adapter = adapter
        self.rows: list[BatchRow] = []
        self.log: list[tuple] = []
        self.lock = threading.Lock()

    def kv_bytes_per_token(self) -> int:
        return 1

    def auto_budget_bytes(self) -> int:
        return 10**12

    def need(self, job: ModelJob) -> int:
        return 10 + job.options.max_new_tokens

    @staticmethod
    def _script(job):
        first, pieces, *fail = job.question.split(":")
        return int(first), int(pieces), (fail[0] if fail else "")

    def prefill(self, job, piece_tokens):
        first, pieces, fail = self._script(job)
        for i in range(pieces):
            if fail == "prefill" and i == pieces - 1:
                raise RuntimeError("injected fault in one prefill")
            self.log.append(("piece", job.question, i))
            if i < pieces - 1:
                yield
        logits = torch.full((VOCAB,), -1e9)
        logits[first] = 0.0
        if fail == "nan":
            logits[:] = float("nan")
        return TurnStart(logits=logits, new_evidence=[], recomputed_tokens=0, timings={})

    def join(self, job, first_token):
        row = BatchRow(ctx=job, next_token=first_token, position=0, length=10)
        self.rows.append(row)
        return row

    def decode(self):
        self.log.append(("decode", tuple(r.ctx.question for r in self.rows)))
        if any(self._script(r.ctx)[2] == "forward" for r in self.rows):
            raise RuntimeError("injected fault in the batched forward")
        logits = torch.full((len(self.rows), VOCAB), -1e9)
        for i, row in enumerate(self.rows):
            logits[i, (row.next_token + 1) % VOCAB] = 0.0
            row.length += 1
        return list(self.rows), logits

    def take_token(self, tokens, token, options, on_token):
        if token == EOS:
            return False
        tokens.append(token)
        if on_token is not None:
            on_token(token)
        return len(tokens) < options.max_new_tokens

    def leave(self, row, keep):
        self.rows.remove(row)

    def end_turn(self, job, started, tokens):
        return AnswerResult(text=" ".join(map(str, tokens)), token_ids=list(tokens),
                            first_logits=started.logits, recomputed_tokens=0)

    def reset(self):
        self.rows = []


class _Observer:
    def __init__(self, fail_batch=False):
        self.batches, self.rejections, self.fail_batch = [], [], fail_batch

    def queue_depth(self, n): pass
    def running(self, n): pass
    def rejected(self, reason): self.rejections.append(reason)
    def queue_wait(self, seconds): pass

    def batch(self, size):
        if self.fail_batch:
            self.fail_batch = False
            raise RuntimeError("injected fault in the scheduler loop")
        self.batches.append(size)


@pytest.fixture
def engine():
    made = []

    def build(observer=None, **limits):
        scheduler = BatchScheduler(lambda: "fake-model", runner=lambda a: made.append(FakeRunner(a)) or made[-1],
                                   observer=observer or _Observer(), **{
                                       "queue_size": 64, "max_batch": 8, "max_tokens_in_flight": 1 << 20,
                                       "max_wait_s": WAIT_S, **limits})
        built.append(scheduler)
        return scheduler, made

    built: list[BatchScheduler] = []
    yield build
    for scheduler in built:
        scheduler.close()


def _job(script: str, max_new=4, temperature=0.0, **kwargs) -> ModelJob:
    return ModelJob(state=None, chunks=[], question=script, image=None,
                    options=GenerationOptions(max_new_tokens=max_new, temperature=temperature), **kwargs)


def _ask(scheduler, job):
    try:
        with scheduler.admit():
            return scheduler.run(job)
    except Exception as exc:  # noqa: BLE001 - the test looks at which
        return exc


def _concurrently(scheduler, jobs):
    with ThreadPoolExecutor(min(len(jobs), 32)) as pool:  # within the queue: no refusals
        return list(pool.map(lambda j: _ask(scheduler, j), jobs))


def test_answers_follow_the_script_alone_and_together(engine):
    scheduler, _ = engine()
    assert _ask(scheduler, _job("5:3")).token_ids == [5, 6, 7, 8]
    results = _concurrently(scheduler, [_job(f"{10 * i}:{i + 1}") for i in range(6)])
    assert [r.token_ids for r in results] == [[10 * i + k for k in range(4)] for i in range(6)]
    assert scheduler.stats() == {"admitted": 0, "waiting": 0, "admitting": 0, "running": 0}


def test_a_joining_prefill_stalls_the_decoding_rows_one_piece_per_step(engine):
    scheduler, runners = engine()
    gate = threading.Event()
    long = _job("40:6", max_new=2)

    def on_token(token):  # once the first row decodes, the long prefill joins
        if token == 2:
            threading.Thread(target=_ask, args=(scheduler, long)).start()
            gate.wait(WAIT_S)

    first = _job("1:1", max_new=12, on_token=on_token)
    runner_thread = threading.Thread(target=_ask, args=(scheduler, first))
    runner_thread.start()
    while scheduler.stats()["waiting"] + scheduler.stats()["admitting"] == 0 and runner_thread.is_alive():
        threading.Event().wait(0.005)
    gate.set()
    runner_thread.join(WAIT_S)
    assert first.result.token_ids == list(range(1, 13)) and long.done.wait(WAIT_S)
    assert long.result.token_ids == [40, 41]
    log = runners[0].log
    pieces = [i for i, entry in enumerate(log) if entry[:2] == ("piece", "40:6")]
    assert len(pieces) == 6
    # between two consecutive pieces of the joining prefill the first row decoded
    for a, b in zip(pieces, pieces[1:]):
        assert any(entry[0] == "decode" and "1:1" in entry[1] for entry in log[a:b]), log[a:b + 1]


@pytest.mark.parametrize("fault", ["prefill", "nan", "forward"])
def test_one_requests_fault_fails_it_alone(engine, fault):
    scheduler, _ = engine()
    jobs = [_job(f"{10 * i}:2") for i in range(3)] + [_job(f"50:2:{fault}", temperature=0.8)]
    results = _concurrently(scheduler, jobs)
    assert isinstance(results[3], Internal), results[3]
    cause = str(results[3].__cause__)
    assert "injected" in cause or "probability" in cause, cause
    for i in range(3):
        if fault == "forward" and isinstance(results[i], Internal):
            continue  # a failed batched forward fails the rows in it, not the ones after it
        assert results[i].token_ids == [10 * i + k for k in range(4)], (i, results[i])
    assert scheduler.stats()["admitted"] == 0
    # the engine goes on
    assert _ask(scheduler, _job("7:1")).token_ids == [7, 8, 9, 10]


def test_a_thousand_faulted_asks_give_every_slot_back(engine):
    scheduler, _ = engine()
    results = _concurrently(scheduler, [_job(f"{i % 60}:1:{('prefill', 'nan')[i % 2]}", temperature=0.8)
                                        for i in range(1000)])
    assert all(isinstance(r, Internal) for r in results)
    assert scheduler.stats() == {"admitted": 0, "waiting": 0, "admitting": 0, "running": 0}


def test_a_dying_loop_fails_what_it_held_and_restarts(engine):
    observer = _Observer(fail_batch=True)
    scheduler, _ = engine(observer)
    results = _concurrently(scheduler, [_job(f"{10 * i}:1") for i in range(3)])
    failed = [i for i, r in enumerate(results) if isinstance(r, Internal)]
    assert failed, results  # what the loop held when it died failed at once ...
    for i, r in enumerate(results):  # ... and what came after ran on the restarted loop
        assert i in failed or r.token_ids == [10 * i + k for k in range(4)], (i, r)
    assert scheduler.healthy()
    assert _ask(scheduler, _job("3:1")).token_ids == [3, 4, 5, 6]


def test_the_token_limit_runs_requests_one_after_another(engine):
    observer = _Observer()
    scheduler, _ = engine(observer, max_tokens_in_flight=20)  # one request needs 14
    results = _concurrently(scheduler, [_job(f"{10 * i}:2") for i in range(3)])
    assert [r.token_ids for r in results] == [[10 * i + k for k in range(4)] for i in range(3)]
    assert max(observer.batches) == 1


def test_a_deadline_passing_in_the_queue_ends_the_request_before_any_model_work(engine):
    import time

    scheduler, runners = engine(max_batch=1)
    hold, holding = threading.Event(), threading.Event()

    def blocks(token):
        holding.set()
        hold.wait(WAIT_S)

    holder = threading.Thread(target=_ask, args=(scheduler, _job("1:1", max_new=2, on_token=blocks)))
    holder.start()
    assert holding.wait(WAIT_S)
    late = _job("30:1", deadline=time.monotonic() + 0.2)
    outcome: list = []  # refused at once or ended in the queue: either way DEADLINE_EXCEEDED
    waiter = threading.Thread(target=lambda: outcome.append(_ask(scheduler, late)))
    waiter.start()
    time.sleep(0.4)  # its deadline passes while it waits behind the holder (max_batch=1)
    hold.set()
    holder.join(WAIT_S)
    waiter.join(WAIT_S)
    assert len(outcome) == 1 and isinstance(outcome[0], DeadlineExceeded), outcome
    assert not any(entry[:2] == ("piece", "30:1") for entry in runners[0].log)
    assert scheduler.stats()["admitted"] == 0


def test_a_request_cancelled_between_pieces_ends_at_the_next_step(engine):
    scheduler, runners = engine()
    cancelled = threading.Event()
    job = _job("20:5", cancelled=cancelled.is_set)
    cancelled.set()
    assert isinstance(_ask(scheduler, job), CallEnded)
    assert len([e for e in runners[0].log if e[:2] == ("piece", "20:5")]) <= 1
