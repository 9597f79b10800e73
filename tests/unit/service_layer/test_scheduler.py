"""The batched model scheduler through the Ask use case: concurrent Asks decoded in shared
forwards get, token for token, the answers they get alone (tiny Qwen2-VL and SmolLM2; mixed
lengths, budgets and options; one call cancelled mid-way); seeded sampling is reproducible; a
full queue refuses at once with RESOURCE_EXHAUSTED; a job whose deadline passes in the queue is
refused, not computed; conversations continue from a batched turn; closing ends waiting jobs.

Tolerance: greedy answers identical (a padded row differs from its solo run by float rounding
only, see ``engine.batch``)."""

from __future__ import annotations

import threading
import time

import pytest

from personalkv.bootstrap import bootstrap
from personalkv.service_layer import answering
from personalkv.service_layer.answering import AskOptions, CallLimits
from personalkv.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from personalkv.engine.scheduler import BatchScheduler
from tests.unit.service_layer.test_recognizer_in_ask import _ingest

pytestmark = pytest.mark.slow

ASKS = [  # (question, options): mixed lengths, budgets, sampling
    ("Tell me about Thing0.", AskOptions(max_new_tokens=12)),
    ("What colour is Thing1, and where do I keep it when I travel for work in winter?",
     AskOptions(max_new_tokens=5)),
    ("Hello!", AskOptions(max_new_tokens=16)),
    ("Is Thing0 older than Thing1?", AskOptions(max_new_tokens=9, recompute_ratio=0.0)),
    ("Describe Thing1 in one line.", AskOptions(max_new_tokens=10, temperature=0.8, seed=7)),
    ("Which one is blue?", AskOptions(max_new_tokens=7, top_k=1)),
]


class _Observer:
    """The scheduler's observer protocol, recorded in lists."""

    def __init__(self):
        self.batches: list[int] = []
        self.rejections: list[str] = []

    def queue_depth(self, n): pass
    def running(self, n): pass
    def batch(self, size): self.batches.append(size)
    def rejected(self, reason): self.rejections.append(reason)
    def queue_wait(self, seconds): pass


def _with_scheduler(svc, **limits) -> _Observer:
    observer = _Observer()
    scheduler = BatchScheduler(lambda: svc.adapter, observer=observer, **{
        "queue_size": 64, "max_batch": 16, "max_tokens_in_flight": 1 << 20, **limits})
    svc.replace("answerer", scheduler)
    return observer


def _concurrently(svc, asks, user="alice", cancel_index=None):
    """Run ``asks`` at once (released together); returns results (or exceptions) in order."""
    results: list = [None] * len(asks)
    gate = threading.Barrier(len(asks))

    def run(i, question, options):
        on_token = None
        if i == cancel_index:
            seen = []

            def on_token(token):  # the caller goes away after three tokens
                seen.append(token)
                if len(seen) == 3:
                    raise ConnectionAbortedError("caller gone")
        gate.wait()
        try:
            results[i] = answering.ask(svc, user, question, [], options, on_token)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, q, o)) for i, (q, o) in enumerate(asks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    return results


def _solo(svc, asks, user="alice"):
    return [answering.ask(svc, user, q, [], o) for q, o in asks]


def _check_batched_equals_solo(svc, **limits):
    observer = _with_scheduler(svc, **limits)
    solo = _solo(svc, ASKS)
    assert observer.batches and max(observer.batches) == 1  # alone: batches of one
    observer.batches.clear()
    batched = _concurrently(svc, ASKS, cancel_index=2)
    assert max(observer.batches) >= 3, observer.batches  # they really shared forwards
    for i, (alone, together) in enumerate(zip(solo, batched)):
        if i == 2:
            assert isinstance(together, ConnectionAbortedError)  # cancelled mid-way
            continue
        assert together.token_ids == alone.token_ids, (i, together.answer, alone.answer)
        assert together.answer == alone.answer
    # the cancelled call freed its row: the next Ask is answered normally
    assert answering.ask(svc, "alice", ASKS[0][0], [], ASKS[0][1]).token_ids == solo[0].token_ids


def test_batched_answers_equal_solo_answers_tiny(svc):
    _ingest(svc, 0)
    _ingest(svc, 1)
    _check_batched_equals_solo(svc)


def test_prefills_in_small_pieces_between_decode_steps_give_the_same_answers(svc):
    """Chunked prefill at 3 tokens a piece: every joining question is fed over many loop
    iterations, interleaved with the others' decode steps; the answers do not change."""
    _ingest(svc, 0)
    _ingest(svc, 1)
    _check_batched_equals_solo(svc, prefill_piece_tokens=3)


def test_batched_answers_equal_solo_answers_smollm2(service_settings):
    from personalkv.config import ModelSettings
    from personalkv.models import load_adapter

    svc = bootstrap(service_settings, adapter=load_adapter("smollm2", settings=ModelSettings()))
    try:
        _ingest(svc, 0)
        _ingest(svc, 1)
        _check_batched_equals_solo(svc)
    finally:
        svc.close()


def test_seeded_sampling_is_reproducible_in_any_batch(svc):
    _ingest(svc, 0)
    _with_scheduler(svc)
    sampled = ("Describe Thing0.", AskOptions(max_new_tokens=10, temperature=1.0, seed=3))
    alone = answering.ask(svc, "alice", sampled[0], [], sampled[1])
    together = _concurrently(svc, [sampled, ASKS[0], ASKS[2], sampled])
    assert together[0].token_ids == alone.token_ids == together[3].token_ids


class _HeldModel:
    """Holds the scheduler's loop inside a token callback until released."""

    def __init__(self):
        self.inside, self.release = threading.Event(), threading.Event()

    def __call__(self, _token):
        self.inside.set()
        assert self.release.wait(120)


def test_a_full_queue_refuses_at_once_and_loses_nothing_accepted(svc):
    observer = _with_scheduler(svc, queue_size=2, max_batch=1)
    hold = _HeldModel()
    results = {}

    def ask(name, on_token=None):
        try:
            results[name] = answering.ask(svc, "alice", "Hello!", [], AskOptions(max_new_tokens=4), on_token)
        except Exception as exc:  # noqa: BLE001
            results[name] = exc

    first = threading.Thread(target=ask, args=("held", hold))
    first.start()
    assert hold.inside.wait(120)
    waiting = [threading.Thread(target=ask, args=(f"queued{i}",)) for i in range(2)]
    for t in waiting:
        t.start()
    deadline = time.monotonic() + 60
    while svc.answerer.stats()["admitted"] < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.perf_counter()
    with pytest.raises(ResourceExhausted, match="retry"):
        answering.ask(svc, "alice", "Hello!", [], AskOptions(max_new_tokens=4))
    refused_in = time.perf_counter() - started
    assert refused_in < 5.0  # at once (no model work); generous for a loaded machine
    assert observer.rejections == ["queue_full"]
    hold.release.set()
    for t in [first, *waiting]:
        t.join(timeout=300)
    assert all(isinstance(r, answering.AskResult) for r in results.values()), results
    assert len(results) == 3


def test_a_job_whose_deadline_passes_in_the_queue_is_refused(svc):
    observer = _with_scheduler(svc, max_batch=1)
    hold = _HeldModel()
    held = threading.Thread(target=answering.ask, args=(svc, "alice", "Hello!", [],
                                                        AskOptions(max_new_tokens=4), hold))
    held.start()
    assert hold.inside.wait(120)
    out = {}

    def late():
        try:
            answering.ask(svc, "alice", "Hello!", [], AskOptions(max_new_tokens=4),
                          call=CallLimits(deadline=time.monotonic() + 0.5))
        except Exception as exc:  # noqa: BLE001
            out["error"] = exc

    waiter = threading.Thread(target=late)
    waiter.start()
    time.sleep(1.0)  # its deadline passes while the model is held
    hold.release.set()
    waiter.join(timeout=300)
    held.join(timeout=300)
    assert isinstance(out.get("error"), DeadlineExceeded)
    assert "deadline" in observer.rejections


def test_a_conversation_continues_from_a_batched_turn(svc):
    _ingest(svc, 0)
    _with_scheduler(svc)
    greedy = AskOptions(max_new_tokens=8)
    first = _concurrently(svc, [("Tell me about Thing0.", greedy), ASKS[2], ASKS[1]])[0]
    # a conversation started while others were decoding, continued from its kept KV ...
    opened = answering.ask(svc, "alice", "Tell me about Thing0.", [], greedy, start_conversation=True)
    assert opened.token_ids == first.token_ids
    cid = opened.conversation_id
    kept = answering.ask(svc, "alice", "And where does it live?", [], greedy, conversation_id=cid)
    # ... equals the same conversation answered by the thread-per-request path
    from personalkv.engine.scheduler import ThreadAnswerer

    svc.replace("answerer", ThreadAnswerer(lambda: svc.adapter))
    again = answering.ask(svc, "alice", "Tell me about Thing0.", [], greedy, start_conversation=True)
    threads = answering.ask(svc, "alice", "And where does it live?", [], greedy,
                            conversation_id=again.conversation_id)
    assert kept.token_ids == threads.token_ids and opened.token_ids == again.token_ids


def test_closing_ends_waiting_jobs_with_unavailable(svc):
    _with_scheduler(svc, max_batch=1)
    hold = _HeldModel()
    held = threading.Thread(target=lambda: _swallow(lambda: answering.ask(
        svc, "alice", "Hello!", [], AskOptions(max_new_tokens=4), hold)))
    held.start()
    assert hold.inside.wait(120)
    out = {}
    waiter = threading.Thread(target=lambda: out.setdefault("r", _swallow(lambda: answering.ask(
        svc, "alice", "Hello!", [], AskOptions(max_new_tokens=4)))))
    waiter.start()
    time.sleep(0.5)
    closer = threading.Thread(target=svc.answerer.close)
    closer.start()
    time.sleep(0.2)
    hold.release.set()
    for t in (held, waiter, closer):
        t.join(timeout=300)
    assert isinstance(out["r"], Unavailable)
    with pytest.raises(Unavailable):
        answering.ask(svc, "alice", "Hello!", [], AskOptions(max_new_tokens=4))


def _swallow(fn):
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        return exc


def test_a_question_that_can_never_fit_is_refused_at_once(svc):
    from personalkv.engine.memory import kv_bytes_per_token

    _ingest(svc, 0)
    per_token = kv_bytes_per_token(svc.adapter)
    observer = _with_scheduler(svc, kv_budget_bytes=300 * per_token)  # less than one answer's peak
    started = time.perf_counter()
    with pytest.raises(ResourceExhausted, match="more than this server can hold"):
        answering.ask(svc, "alice", "Tell me about Thing0.", [], AskOptions(max_new_tokens=64))
    assert time.perf_counter() - started < 30  # no model work (generous: a loaded machine)
    assert observer.rejections == ["too_large"]
    assert svc.answerer.stats()["admitted"] == 0
    _with_scheduler(svc, max_tokens_in_flight=20)  # the token limit refuses the same way
    with pytest.raises(ResourceExhausted, match="tokens of KV"):
        answering.ask(svc, "alice", "Tell me about Thing0.", [], AskOptions(max_new_tokens=64))


def test_the_kv_limits_hold_requests_back_until_they_fit(svc, monkeypatch):
    """With room for one request's KV at a time (tokens, then bytes), concurrent Asks decode one
    after another, and each answer is still its solo answer."""
    from personalkv.engine.memory import admission_peak_bytes, kv_bytes_per_token

    _ingest(svc, 0)
    _ingest(svc, 1)
    asks = ASKS[:3]
    from personalkv.engine.runner import ModelRunner

    needs, real = [], ModelRunner.need

    def recorded(self, job):
        needs.append(real(self, job))
        return needs[-1]

    monkeypatch.setattr(ModelRunner, "need", recorded)
    _with_scheduler(svc)
    solo = _solo(svc, asks)
    need = max(needs)  # the largest request's KV: each fits alone, no two together
    per_token = kv_bytes_per_token(svc.adapter)
    for limits in ({"max_tokens_in_flight": need},
                   {"kv_budget_bytes": admission_peak_bytes([], need, per_token)}):
        observer = _with_scheduler(svc, **limits)
        batched = _concurrently(svc, asks)
        assert observer.batches and max(observer.batches) == 1, (limits, observer.batches)
        assert [b.token_ids for b in batched] == [s.token_ids for s in solo]


def test_a_conversation_rebuild_runs_on_the_engine_loop(svc, monkeypatch):
    """Issue 29: a rebuild's replay is model work: it runs on the scheduler's loop thread (the
    model has one user), not in the RPC thread, and the rebuilt follow-up answers as the kept one."""
    from personalkv.kv.conversation import ConversationKV

    _ingest(svc, 0)
    _with_scheduler(svc)
    greedy = AskOptions(max_new_tokens=6)
    cid = answering.ask(svc, "alice", "Tell me about Thing0.", [], greedy, start_conversation=True).conversation_id
    kept = answering.ask(svc, "alice", "And where does it live?", [], greedy, conversation_id=cid)
    record, version = svc.store.read_conversation("alice", cid)
    svc.store.update_conversation(record.model_copy(update={"turns": record.turns[:1]}), version)
    svc.conversations.drop("alice")
    replayed_on, real = [], ConversationKV.turn

    def recorded(self, *args, answer_ids=None, **kwargs):
        if answer_ids is not None:
            replayed_on.append(threading.current_thread().name)
        return real(self, *args, answer_ids=answer_ids, **kwargs)

    monkeypatch.setattr(ConversationKV, "turn", recorded)
    rebuilt = answering.ask(svc, "alice", "And where does it live?", [], greedy, conversation_id=cid)
    assert replayed_on == ["pkv-answer-scheduler"]
    assert rebuilt.token_ids == kept.token_ids and rebuilt.timings.rebuild > 0
