"""Helpers shared by the use cases: id checks, manifest lookup, transient-error mapping."""

from __future__ import annotations

from contextlib import contextmanager

from personalkv.ids import InvalidIdError, validate_concept_id, validate_user_id
from personalkv.index.base import IndexUnavailable
from personalkv.manifest import ConceptManifest, ConceptProfile
from personalkv.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from personalkv.storage.base import StorageUnavailable
from personalkv.storage.chunk_store import DamagedManifestError
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


#: What a client reads as the failure_reason of a concept whose manifest is damaged.
DAMAGED_REASON = ("the concept's stored record is damaged and cannot be read; delete the "
                  "concept and create it again")


def damaged_concept(error: DamagedManifestError) -> ConceptManifest:
    """What clients see of a concept whose manifest does not parse: that concept FAILED, with
    a reason they can act on (and no key or parser text), named by its id."""
    return ConceptManifest(user_id=error.user_id, concept_id=error.concept_id, state="failed",
                           failure_reason=DAMAGED_REASON,
                           profile=ConceptProfile(name=error.concept_id))


def refuse_damaged(error: DamagedManifestError) -> FailedPrecondition:
    """The error for a change to a concept whose manifest is damaged."""
    return FailedPrecondition(f"concept {error.concept_id!r} cannot be changed: {DAMAGED_REASON}")


def require_manifest(svc: Services, user_id: str, concept_id: str, *,
                     to_change: bool = False) -> ConceptManifest:
    """The concept's manifest; NotFound when it does not exist. A damaged one reads as
    ``damaged_concept``, or, ``to_change`` it, refuses with FailedPrecondition."""
    check_ids(user_id, concept_id)
    try:
        with dependencies("the object store"):
            manifest = svc.store.read_manifest(user_id, concept_id)
    except DamagedManifestError as exc:
        if to_change:
            raise refuse_damaged(exc) from None
        return damaged_concept(exc)
    if manifest is None:
        raise NotFound(f"concept {concept_id!r} does not exist")
    return manifest
