"""Helpers shared by the use cases: id checks, manifest lookup, transient-error mapping."""

from __future__ import annotations

from contextlib import contextmanager

from personalkv.ids import InvalidIdError, validate_concept_id, validate_user_id
from personalkv.index.base import IndexUnavailable
from personalkv.manifest import ConceptManifest
from personalkv.service_layer.errors import InvalidArgument, NotFound, Unavailable
from personalkv.storage.base import StorageUnavailable
from personalkv.service_layer.services import Services


def check_ids(user_id: str, concept_id: str | None = None) -> None:
    try:
        validate_user_id(user_id)
        if concept_id is not None:
            validate_concept_id(concept_id)
    except InvalidIdError as exc:
        raise InvalidArgument(str(exc)) from None


def transient_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "a dependency is down": mapped to Unavailable and retried. Each
    adapter translates its client library's errors into its own transient type (the index:
    ``IndexUnavailable``; a permanent ``IndexRequestError`` is not retried)."""
    return (StorageUnavailable, IndexUnavailable, ConnectionError, TimeoutError)


@contextmanager
def dependencies(what: str):
    """Map a dependency outage inside the block to ``Unavailable`` (retryable)."""
    try:
        yield
    except Unavailable:
        raise
    except transient_errors() as exc:
        # The caller's message names the dependency only; endpoint and library text stay in
        # the chained exception, which the API layer logs under the request id.
        raise Unavailable(f"{what} is unavailable; retry later") from exc


def require_manifest(svc: Services, user_id: str, concept_id: str) -> ConceptManifest:
    check_ids(user_id, concept_id)
    with dependencies("the object store"):
        manifest = svc.store.read_manifest(user_id, concept_id)
    if manifest is None:
        raise NotFound(f"concept {concept_id!r} does not exist")
    return manifest
