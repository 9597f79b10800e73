"""Errors of the library's use cases and engine: what went wrong, in words a user can act on.

Raised by every use case in ``personalkv.service_layer``; the gRPC servicers map each class to one
status code (``InvalidArgument`` -> INVALID_ARGUMENT, ``AlreadyExists`` -> ALREADY_EXISTS (or
INVALID_ARGUMENT, it is a subclass), ``NotFound`` -> NOT_FOUND, ``PermissionDenied`` ->
PERMISSION_DENIED, ``ResourceExhausted`` -> RESOURCE_EXHAUSTED, ``FailedPrecondition`` ->
FAILED_PRECONDITION, ``Aborted`` -> ABORTED, ``DeadlineExceeded`` -> DEADLINE_EXCEEDED,
``Internal`` -> INTERNAL, ``Unavailable`` -> UNAVAILABLE),
and the Celery tasks retry on ``Unavailable`` only. ``str(error)`` is the human message.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base class; ``message`` is safe to show to the caller (no internals, no other tenant)."""

    code = "UNKNOWN"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    code = "INVALID_ARGUMENT"


class AlreadyExists(InvalidArgument):
    """Creating something that exists (a concept id the user already has)."""

    code = "ALREADY_EXISTS"


class NotFound(ServiceError):
    code = "NOT_FOUND"


class PermissionDenied(ServiceError):
    code = "PERMISSION_DENIED"


class ResourceExhausted(ServiceError):
    """A limit was hit: photo too large, too many pixels or photos, a budget."""

    code = "RESOURCE_EXHAUSTED"


class FailedPrecondition(ServiceError):
    """The request cannot run in the state things are in (a conversation at its limit, or
    whose model or evidence changed); retrying the same request will not help."""

    code = "FAILED_PRECONDITION"


class Aborted(ServiceError):
    """A concurrent request won (another question in the same conversation); retry after it."""

    code = "ABORTED"


class DeadlineExceeded(ServiceError):
    """The call's deadline passes (or passed) before the work could be done for it."""

    code = "DEADLINE_EXCEEDED"


class CallEnded(ServiceError):
    """The caller went away (cancelled, or its deadline passed) while its work waited or ran:
    the work was stopped; nobody reads this answer."""

    code = "CANCELLED"


class Internal(ServiceError):
    """The server failed on this request alone (a fault while the model ran it): the details
    are in the server's log under the request id the caller sees; other requests go on."""

    code = "INTERNAL"


class Unavailable(ServiceError):
    """A dependency (object store, index, broker) is down; retrying later may succeed."""

    code = "UNAVAILABLE"


__all__ = [
    "Aborted", "AlreadyExists", "CallEnded", "DeadlineExceeded", "FailedPrecondition", "Internal",
    "InvalidArgument", "NotFound",
    "PermissionDenied", "ResourceExhausted", "ServiceError", "Unavailable",
]
