"""What a servicer asks of its call: whom the RPC acts for, and whether anyone still waits.

Who calls what: the servicers in ``services/ingestion/server.py`` and
``services/answering/server.py`` call ``caller()`` on every RPC, and ``client_gone()`` between
upload chunks (ingestion) and between generated tokens (answering) to stop work nobody will
read; ``personalkv.api.errors`` calls ``client_gone()`` to record a failed call whose client is
gone as CANCELLED instead of mapping its error. ``client_gone()`` is the one answer to "has the
client gone?" in the API layer.
"""

from __future__ import annotations

import threading

import grpc

from personalkv.auth import current_user_id
from personalkv.ids import validate_user_id
from personalkv.errors import PermissionDenied


def caller(request_user_id: str = "") -> str:
    """The user an RPC acts for: the token's. A request may name a user explicitly; it must
    be a valid id (else INVALID_ARGUMENT) and the token's own (else PERMISSION_DENIED)."""
    user_id = current_user_id()
    if request_user_id:
        validate_user_id(request_user_id)
        if request_user_id != user_id:
            raise PermissionDenied("the token may only act for its own user; user_id names another")
    return user_id


def client_gone(context: grpc.ServicerContext, wait_s: float = 0.0) -> bool:
    """Whether the client is gone: it cancelled the call, or the call's deadline has passed.

    A cancelled request stream can look like a normal end of stream to the servicer for a
    moment; ``wait_s`` gives the cancellation that long to arrive (for a stream that ended
    where no client would end it)."""

    def gone() -> bool:
        remaining = context.time_remaining()
        return not context.is_active() or (remaining is not None and remaining <= 0)

    if gone():
        return True
    if wait_s > 0:
        done = threading.Event()
        context.add_callback(done.set)  # runs when the RPC terminates (cancelled here)
        return done.wait(wait_s) or gone()
    return False
