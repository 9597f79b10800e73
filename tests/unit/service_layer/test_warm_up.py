"""Readiness means ready (issues 30, 31): ``answering.warm_up`` does before the server reports
SERVING what the first Asks would all pay for at once, and the model's fingerprint is computed
once however many Asks ask for it together (a fresh server hit by a burst of 80 Asks hashed its
weights 80 times over)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from personalkv.models.base import ModelAdapter
from personalkv.service_layer import answering
from personalkv.service_layer.answering import AskOptions
from tests.unit.service_layer.test_recognizer_in_ask import _ingest
from tests.unit.service_layer.test_scheduler import _with_scheduler


def test_warm_up_leaves_nothing_for_the_first_ask_to_load(svc, monkeypatch):
    _ingest(svc, 0)
    _with_scheduler(svc)
    svc.adapter._fingerprint = None  # (the session's tiny model may have it from other tests)
    answering.warm_up(svc)
    assert svc.adapter._fingerprint is not None
    assert svc.answerer.stats() == {"admitted": 0, "waiting": 0, "admitting": 0, "running": 0}

    def not_again(self):
        raise AssertionError("the fingerprint was computed again after the warm-up")

    monkeypatch.setattr(ModelAdapter, "_compute_fingerprint", not_again)
    result = answering.ask(svc, "alice", "Tell me about Thing0.", [], AskOptions(max_new_tokens=2))
    assert [c.concept_id for c in result.concepts] == ["thing0"]


def test_concurrent_first_callers_compute_the_fingerprint_once(svc, monkeypatch):
    adapter = svc.adapter
    adapter._fingerprint = None
    real, calls = ModelAdapter._compute_fingerprint, []

    def slow(self):
        calls.append(threading.current_thread().name)
        time.sleep(0.2)  # long enough for every caller to arrive while it runs
        return real(self)

    monkeypatch.setattr(ModelAdapter, "_compute_fingerprint", slow)
    with ThreadPoolExecutor(8) as pool:
        prints = list(pool.map(lambda _: adapter.fingerprint(), range(8)))
    assert len(calls) == 1 and len(set(prints)) == 1
