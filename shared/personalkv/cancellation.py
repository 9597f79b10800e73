"""Cooperative cancellation of long CPU work on a request's behalf (a photo's recognition):
the request's thread declares when to stop (``stop_when``), and the work checks between its
steps (``check_stop``), so that a call whose deadline passed or whose client went away does not
keep a core busy for nobody. A context variable, so it needs no parameter through every layer
and each thread (each request) has its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from personalkv.errors import CallEnded

#: returns why to stop ("" or None: go on)
_stop: ContextVar[Callable[[], str | None] | None] = ContextVar("personalkv_stop", default=None)


@contextmanager
def stop_when(reason: Callable[[], str | None]) -> Iterator[None]:
    """Within the block, ``check_stop`` raises ``CallEnded`` once ``reason()`` says why."""
    token = _stop.set(reason)
    try:
        yield
    finally:
        _stop.reset(token)


def check_stop() -> None:
    """Raise ``CallEnded`` if the current request's work should stop (no-op outside one)."""
    reason = _stop.get()
    if reason is not None and (why := reason()):
        raise CallEnded(f"stopped: {why}")
