"""The one mapping from service-layer errors to gRPC status codes.

Every servicer method is wrapped by `grpc_errors`; nothing else in the API layer picks a
status code for a failure. ServiceError subclasses carry the code name and a message safe to
show the caller; an invalid id (personalkv.ids) is INVALID_ARGUMENT; anything unexpected is
logged with its traceback and answered INTERNAL with a message that reveals nothing.

Server-side failures (UNAVAILABLE, INTERNAL, ...) get a request id: the log line holds the
details (exception chain: endpoint, library error) under it, the caller's message only says
what failed, whether to retry, and the id to quote. A call nobody waits for any more
(``personalkv.api.context.client_gone``) is logged at INFO and recorded as what happened, not
as an error: CANCELLED when the client cancelled, DEADLINE_EXCEEDED when its deadline passed
(``abort_client_gone``, the one place that tells them apart).
"""

from __future__ import annotations

import functools
import inspect
import logging
import secrets

import grpc
from PIL.Image import DecompressionBombError

from personalkv.api.context import client_gone
from personalkv.ids import InvalidIdError
from personalkv.errors import ServiceError

log = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error; the server logged the details"


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """(status code, message) the caller gets for `exc`."""
    if isinstance(exc, ServiceError):
        code = getattr(grpc.StatusCode, exc.code, None)
        return (code or grpc.StatusCode.UNKNOWN), exc.message
    if isinstance(exc, InvalidIdError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, DecompressionBombError):  # Pillow's own guard, should a check miss it
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"the photo has too many pixels ({exc})"
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


#: Codes whose cause is on the server's side: the message gets a request id, the log details.
_SERVER_SIDE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                grpc.StatusCode.DEADLINE_EXCEEDED}


def new_request_id() -> str:
    return secrets.token_hex(6)


def abort_client_gone(context: grpc.ServicerContext, method: str) -> None:
    """End a call whose client is gone (raises, like abort), logged at INFO: DEADLINE_EXCEEDED
    when its deadline passed, else CANCELLED (the client cancelled it or went away)."""
    code, message = client_gone_status(context, method)
    context.abort(code, message)


def client_gone_status(context: grpc.ServicerContext, method: str) -> tuple[grpc.StatusCode, str]:
    """What a call whose client is gone ended as (logged at INFO): DEADLINE_EXCEEDED when its
    deadline passed, else CANCELLED."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        code, message = grpc.StatusCode.DEADLINE_EXCEEDED, "the call's deadline passed"
    else:
        code, message = grpc.StatusCode.CANCELLED, "cancelled by the client"
    log.info("rpc ended: %s", message, extra={"method": method, "code": code.name})
    return code, message


def abort_undecodable(context: grpc.ServicerContext, method: str, message_type: str) -> None:
    """Refuse a request whose bytes do not parse as ``message_type`` (malformed protobuf,
    invalid UTF-8 in a string field): INVALID_ARGUMENT with a request id, logged at INFO
    (the caller's bytes are at fault; nothing to trace back). Raises, like abort."""
    request_id = new_request_id()
    log.info("rpc refused", extra={"method": method, "code": "INVALID_ARGUMENT",
                                   "reason": "undecodable request", "request_id": request_id})
    context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                  f"the request is not a valid {message_type} message (malformed protobuf or a "
                  f"string that is not UTF-8) (request id {request_id})")


def _abort(context: grpc.ServicerContext, exc: Exception, method: str) -> None:
    if context.code() is not None:  # the servicer already aborted (context.abort raised)
        raise exc
    if client_gone(context):  # the client cancelled or its deadline passed
        abort_client_gone(context, method)
    code, message = status_for(exc)
    if code in _SERVER_SIDE:
        request_id = new_request_id()
        extra = {"method": method, "code": code.name, "request_id": request_id}
        if code is grpc.StatusCode.INTERNAL:
            log.exception("unexpected error in %s", method, extra=extra)
        else:
            cause = exc.__cause__ or exc.__context__
            log.warning("rpc failed: %s%s", message,
                        f" ({type(cause).__name__}: {cause})" if cause else "", extra=extra)
        message = f"{message} (request id {request_id})"
    else:
        log.info("rpc refused", extra={"method": method, "code": code.name, "reason": message})
    context.abort(code, message)


def grpc_errors(method):
    """Decorator for servicer methods (unary or streaming): errors -> status via status_for."""
    name = method.__qualname__
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream_wrapper(self, request, context):
            try:
                yield from method(self, request, context)
            except Exception as exc:  # noqa: BLE001 - mapped, logged, never swallowed
                _abort(context, exc, name)

        return stream_wrapper

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - mapped, logged, never swallowed
            _abort(context, exc, name)

    return wrapper
