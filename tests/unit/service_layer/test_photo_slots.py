"""Photo Asks queue for recognition among themselves (``service.photo_recognitions`` slots):
while every slot is busy a text Ask is answered at once, the photo Ask waits and is answered
when a slot frees, and a photo Ask whose deadline passes while waiting is refused; one user
never holds every slot, so another user's photo Ask always finds one."""

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
    """Every slot, each held by another user (one user may not hold them all)."""
    held = 0
    while svc.photo_slots.acquire(f"holder{held}", blocking=False):
        held += 1
    return held


def _release(svc, held: int) -> None:
    for i in range(held):
        svc.photo_slots.release(f"holder{i}")


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
    _release(svc, held)
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
        _release(svc, held)


def test_one_user_never_holds_every_slot():
    from personalkv.service_layer.photo_slots import FairSlots

    slots = FairSlots(3)
    assert slots.acquire("mallory", blocking=False) and slots.acquire("mallory", blocking=False)
    assert not slots.acquire("mallory", timeout=0.05)  # her third waits (here: times out) ...
    assert slots.acquire("alice", blocking=False)  # ... while another user gets the last slot
    assert not slots.acquire("bob", blocking=False)  # all 3 busy
    slots.release("alice")
    assert slots.acquire("bob", blocking=False)
    with pytest.raises(ValueError):
        slots.release("alice")  # not held
    one = FairSlots(1)  # a single slot: its user may hold it
    assert one.acquire("mallory", blocking=False) and not one.acquire("alice", blocking=False)
