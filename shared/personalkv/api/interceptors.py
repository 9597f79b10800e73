"""The gRPC server interceptors of both servers: authentication and metrics.

Installed by ``personalkv.api.server.GrpcServer`` in this order: ``MetricsInterceptor``
(outermost, so it also times rejected calls), then ``AuthInterceptor``.

A server interceptor in grpc-python sees only the method name and metadata; to run code
*around* the servicer (with its context), it returns a copy of the handler whose behaviour is
wrapped (``wrap_handler``): for response-streaming methods the wrapper runs around the whole
iteration, so a contextvar set around the call stays set while the servicer's generator runs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import grpc

from personalkv.auth import (
    PUBLIC_METHOD_PREFIXES, InvalidTokenError, acting_as, check_secret, token_from_metadata,
    verify_token,
)
from personalkv.config import AuthSettings
from personalkv.observability import GRPC_LATENCY, rpc_log

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


class AuthInterceptor(grpc.ServerInterceptor):
    """Authenticates every RPC except health and reflection: UNAUTHENTICATED on a missing,
    malformed, forged or expired token; otherwise the servicer runs with current_user_id()."""

    def __init__(self, settings: AuthSettings) -> None:
        self.settings = settings
        check_secret(settings)  # fail at startup, not on the first RPC, if misconfigured

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(PUBLIC_METHOD_PREFIXES):
            return handler
        try:
            token = token_from_metadata(handler_call_details.invocation_metadata)
            user_id = verify_token(token, settings=self.settings)
        except InvalidTokenError as exc:
            return rejecting_handler(handler, grpc.StatusCode.UNAUTHENTICATED, str(exc))
        return wrap_handler(handler, lambda _context: acting_as(user_id))


class MetricsInterceptor(grpc.ServerInterceptor):
    """Records GRPC_LATENCY and one "rpc" log line for every RPC of ``service`` (health too)."""

    def __init__(self, service: str) -> None:
        self.service = service

    @contextlib.contextmanager
    def _timed(self, method: str, context) -> Iterator[None]:
        start = time.perf_counter()
        code = None
        try:
            yield
        except Exception:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        finally:
            code = code or context.code() or grpc.StatusCode.OK
            elapsed = time.perf_counter() - start
            GRPC_LATENCY.labels(self.service, method, code.name).observe(elapsed)
            rpc_log.info("rpc", extra={"grpc_service": self.service, "method": method,
                                       "code": code.name, "duration_ms": round(elapsed * 1e3, 2)})

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method.rsplit("/", 1)[-1]
        return wrap_handler(continuation(handler_call_details),
                            lambda context: self._timed(method, context))
