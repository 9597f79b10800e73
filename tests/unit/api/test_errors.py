"""The one status mapping: every service error class -> its gRPC code, message kept."""

from __future__ import annotations

import grpc
import pytest

from personalkv.api.errors import INTERNAL_MESSAGE, status_for
from personalkv.ids import InvalidIdError
from personalkv import errors

CASES = [
    (errors.InvalidArgument("bad"), grpc.StatusCode.INVALID_ARGUMENT),
    (errors.AlreadyExists("taken"), grpc.StatusCode.ALREADY_EXISTS),
    (errors.NotFound("gone"), grpc.StatusCode.NOT_FOUND),
    (errors.PermissionDenied("no"), grpc.StatusCode.PERMISSION_DENIED),
    (errors.ResourceExhausted("big"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unavailable("down"), grpc.StatusCode.UNAVAILABLE),
]


@pytest.mark.parametrize(("exc", "code"), CASES, ids=[type(e).__name__ for e, _ in CASES])
def test_service_errors_map_to_their_code_with_the_message(exc, code):
    assert status_for(exc) == (code, exc.message)


def test_every_service_error_class_has_a_grpc_code():
    for cls in errors.ServiceError.__subclasses__():
        for sub in [cls, *cls.__subclasses__()]:
            code = status_for(sub("m"))[0]
            assert code is getattr(grpc.StatusCode, sub.code) and code is not grpc.StatusCode.UNKNOWN


def test_invalid_ids_are_invalid_argument_and_the_rest_is_internal_and_opaque():
    assert status_for(InvalidIdError("user id '../x' is invalid")) == (
        grpc.StatusCode.INVALID_ARGUMENT, "user id '../x' is invalid")
    assert status_for(KeyError("secret internals")) == (grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
