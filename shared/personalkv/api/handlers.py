"""Wrapping a grpc.RpcMethodHandler's behaviour: what the server interceptors build on.

A server interceptor in grpc-python sees only the method name and metadata; to run code
*around* the servicer (with its context), it returns a copy of the handler whose behaviour is
wrapped. `around(call)` gets a zero-argument callable that runs the original behaviour and
must return its result; for response-streaming methods the wrapper runs around the whole
iteration, so a contextvar set in `around` stays set while the servicer's generator runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import grpc

Around = Callable[[grpc.ServicerContext], AbstractContextManager]


def _kind(handler: grpc.RpcMethodHandler) -> tuple[str, Callable]:
    for attr in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        behavior = getattr(handler, attr)
        if behavior is not None:
            return attr, behavior
    raise ValueError("handler has no behaviour")


def wrap_handler(handler: grpc.RpcMethodHandler | None, around: Around):
    """A copy of `handler` whose behaviour runs inside `around(context)` (a context manager)."""
    if handler is None:
        return None
    attr, behavior = _kind(handler)
    if handler.response_streaming:

        def wrapped(request, context) -> Iterator:
            with around(context):
                yield from behavior(request, context)

    else:

        def wrapped(request, context):
            with around(context):
                return behavior(request, context)

    return handler._replace(**{attr: wrapped})


def rejecting_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str):
    """A handler of the same kind as `handler` that fails every call with `code`/`message`."""
    attr, _ = _kind(handler)

    def reject(request, context):
        context.abort(code, message)

    return handler._replace(**{attr: reject})
