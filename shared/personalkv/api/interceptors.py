"""The gRPC server interceptors of both servers: authentication and metrics.

Installed by ``personalkv.api.server.GrpcServer`` in this order: ``MetricsInterceptor``
(outermost, so it also times rejected calls), ``AdmissionInterceptor`` (at most a fixed number
of RPCs but health at once, so health always finds a free thread), ``AuthInterceptor``, then
``RequestDecodingInterceptor`` (undecodable requests -> INVALID_ARGUMENT).

A server interceptor in grpc-python sees only the method name and metadata; to run code
*around* the servicer (with its context), it returns a copy of the handler whose behaviour is
wrapped (``wrap_handler``): for response-streaming methods the wrapper runs around the whole
iteration, so a contextvar set around the call stays set while the servicer's generator runs.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import logging

import grpc

from personalkv.auth import (
    PUBLIC_METHOD_PREFIXES, InvalidTokenError, acting_as, check_secret, token_from_metadata,
    verify_token,
)
from personalkv.api.errors import abort_undecodable, client_gone_status, new_request_id
from personalkv.config import AuthSettings
from personalkv.observability import GRPC_LATENCY, rpc_log

log = logging.getLogger(__name__)

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


class AdmissionInterceptor(grpc.ServerInterceptor):
    """At most ``slots`` RPCs other than health and reflection run at once; one more is
    refused at once with UNAVAILABLE ("busy"), so it never waits for a thread. gRPC queues
    calls for a free thread of its pool, health included: with ``slots`` below the pool size,
    whatever the other RPCs wait on (a hung S3, a hung broker), health finds a thread."""

    #: slots only calls without a request stream may take: a burst of uploads (request
    #: streams) never leaves a read (GetConcept, ListConcepts, a unary Ask) refused "busy"
    READ_RESERVE = 2

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._free = threading.BoundedSemaphore(slots)
        self._streams = threading.BoundedSemaphore(max(1, slots - self.READ_RESERVE))

    @contextlib.contextmanager
    def _admitted(self, method: str, context, streaming: bool) -> Iterator[None]:
        if streaming and not self._streams.acquire(blocking=False):
            self._refuse(method, context)
        try:
            if not self._free.acquire(blocking=False):
                self._refuse(method, context)
            try:
                yield
            finally:
                self._free.release()
        finally:
            if streaming:
                self._streams.release()

    def _refuse(self, method: str, context) -> None:
        request_id = new_request_id()
        log.warning("rpc refused: all %d slots busy", self.slots,
                    extra={"method": method, "code": "UNAVAILABLE", "request_id": request_id})
        context.abort(grpc.StatusCode.UNAVAILABLE,
                      f"the server is busy; retry in a moment (request id {request_id})")

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(PUBLIC_METHOD_PREFIXES):
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        streaming = bool(handler.request_streaming)
        return wrap_handler(handler, lambda context: self._admitted(method, context, streaming))


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
        except GeneratorExit:  # gRPC closed a response stream early: nobody reads it any more
            code, _ = client_gone_status(context, method)
            raise
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


class _Undecodable:
    """What the lenient deserializer hands on for bytes that are not the request message."""


_UNDECODABLE = _Undecodable()


class RequestDecodingInterceptor(grpc.ServerInterceptor):
    """Requests (or messages of a request stream) whose bytes do not parse are refused with
    INVALID_ARGUMENT and a request id. grpc-python's own answer to a deserializer that raises
    is INTERNAL "Exception deserializing request!" with a traceback in the log; so the
    deserializer here never raises, and the wrapped behaviour refuses what it could not parse."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer
        message_type = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
        type_name = message_type.full_name if message_type is not None else "request"
        method = handler_call_details.method.rsplit("/", 1)[-1]

        def lenient(data: bytes):
            try:
                return parse(data)
            except Exception:  # noqa: BLE001 - any failure to parse is the caller's bytes
                return _UNDECODABLE

        def check(request, context):
            if request is _UNDECODABLE:
                abort_undecodable(context, method, type_name)
            return request

        attr, behavior = _kind(handler)
        if handler.request_streaming:

            def checked(request_iterator, context):
                return behavior((check(r, context) for r in request_iterator), context)

        else:

            def checked(request, context):
                return behavior(check(request, context), context)

        return handler._replace(request_deserializer=lenient, **{attr: checked})
