"""Photo Asks queue for recognition among themselves (``service.photo_recognitions`` slots):
while every slot is busy a text Ask is answered at once, the photo Ask waits and is answered
when a slot frees, and a photo Ask whose deadline passes while waiting is refused."""

from __future__ import annotations

import threading
import time

import pytest

from personalkv.service_layer import answering
from personalkv.service_layer.answering import AskOptions, CallLimits
from personalkv.errors import DeadlineExceeded
from tests.unit.service_layer.test_recognizer_in_ask import _ingest, _photo

pytestmark = pytest.mark.slow

SHORT = AskOptions(max_new_tokens=3)


def _hold_every_slot(svc) -> int:
    held = 0
    while svc.photo_slots.acquire(blocking=False):
        held += 1
    return held


def test_text_asks_pass_photo_asks_waiting_for_recognition(svc):
    _ingest(svc, 0)
    held = _hold_every_slot(svc)
    assert held == svc.settings.service.photo_recognitions
    out = {}
    waiting = threading.Thread(target=lambda: out.setdefault(
        "photo", answering.ask(svc, "alice", "Is this mine?", [_photo(0, 9)], SHORT)))
    waiting.start()
    text = answering.ask(svc, "alice", "Tell me about Thing0.", [], SHORT)  # not behind it
    assert text.answer is not None and "photo" not in out
    for _ in range(held):
        svc.photo_slots.release()
    waiting.join(timeout=300)
    assert out["photo"].concepts and out["photo"].concepts[0].concept_id == "thing0"


def test_a_photo_ask_past_its_deadline_waiting_for_recognition_is_refused(svc):
    _ingest(svc, 0)
    held = _hold_every_slot(svc)
    try:
        with pytest.raises(DeadlineExceeded, match="recognition"):
            answering.ask(svc, "alice", "Is this mine?", [_photo(0, 9)], SHORT,
                          call=CallLimits(deadline=time.monotonic() + 0.2))
    finally:
        for _ in range(held):
            svc.photo_slots.release()
