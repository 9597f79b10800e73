"""Use cases on a user's concepts: create, add photos, read, list, delete.

Called by the ingestion gRPC servicer, the CLI (``personalkv ingest``) and the demo, each with
the ``Services`` container from ``bootstrap``. Every id is validated first; errors are
``personalkv.errors`` classes. Deletion is idempotent and removes the concept from the
index (it stops being retrievable at once), then from the object store, then from this
process's hot-chunk cache; a retry after a crash finishes the job.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pydantic import ValidationError

from personalkv.manifest import ConceptManifest, ConceptProfile
from personalkv.service_layer import evidence, reconciler
from personalkv.service_layer._common import (
    check_ids, damaged_concept, dependencies, refuse_damaged, require_manifest,
)
from personalkv.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from personalkv.service_layer.photos import validate_photo
from personalkv.storage.base import PreconditionFailed
from personalkv.storage.chunk_store import DamagedManifestError
from personalkv.service_layer.services import Services

log = logging.getLogger(__name__)


def create_concept(svc: Services, user_id: str, concept_id: str, name: str, category: str = "",
                   info: str = "") -> ConceptManifest:
    """A new concept in state ``queued`` holding the user's facts; photos come with
    ``add_photos``. Raises AlreadyExists (an InvalidArgument) when the id is taken."""
    check_ids(user_id, concept_id)
    try:
        profile = ConceptProfile(name=(name or "").strip(), category=(category or "").strip(),
                                 info=(info or "").strip())
        manifest = ConceptManifest(user_id=user_id, concept_id=concept_id, state="queued",
                                   profile=profile)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise InvalidArgument(f"invalid concept: {problems}") from None
    with dependencies("the object store"):
        try:
            return svc.store.create_manifest(manifest)  # only if absent: no race between two
        except PreconditionFailed:
            raise AlreadyExists(f"concept {concept_id!r} already exists") from None


def add_photos(svc: Services, user_id: str, concept_id: str, photos: Sequence[bytes]) -> ConceptManifest:
    """Validate and store reference photos, then enqueue mining. All or nothing on validation:
    one bad photo refuses the call before anything is stored. Re-sending a photo stores
    nothing new (photo ids are content hashes) but checks a ready concept's chunks, and
    enqueues their repair if any is missing or damaged; for a ready concept only the new
    photos are mined and cached later, and it stays answerable meanwhile.

    The manifest update is a compare-and-set, so concurrent uploads to one concept all land.
    Sending photos (even known ones) to a concept whose work lapsed (its worker died, its
    enqueue failed) or whose queued task the broker lost (it restarted empty) enqueues that
    work again. When the broker cannot take the task, the photos stay recorded without a lease
    (or it is cleared) so that the reconciler enqueues the work as soon as the broker is back,
    and the caller gets Unavailable saying so: nothing is left that no task
    will pick up, and sending the same photos again is harmless."""
    require_manifest(svc, user_id, concept_id, to_change=True)
    limits = svc.settings.service
    if not photos:
        raise InvalidArgument("no photos given")
    if len(photos) > limits.max_photos_per_request:
        raise ResourceExhausted(f"{len(photos)} photos in one call; the limit is "
                                f"{limits.max_photos_per_request}")
    validated = []
    for i, data in enumerate(photos):
        try:
            validated.append(validate_photo(data, max_bytes=limits.max_photo_bytes,
                                            max_pixels=limits.max_photo_pixels, keep_image=False))
        except (InvalidArgument, ResourceExhausted) as exc:
            raise type(exc)(f"photo {i + 1} of {len(photos)}: {exc.message}") from None
    new: list = []
    changed = False  # whether the stored manifest is our change (then we enqueue its work)
    lease = None  # taken after the broker's look, below

    def add(fresh: ConceptManifest) -> ConceptManifest | None:
        nonlocal new, changed
        changed = True
        have = {p.photo_id for p in fresh.photos}
        new = []
        for record in records:
            if record.photo_id not in have:
                have.add(record.photo_id)
                new.append(record)
        if new or fresh.state == "failed":
            return fresh.model_copy(update={"photos": list(fresh.photos) + new, "state": "queued",
                                            "failure_reason": None, "lease_until": lease})
        if reconciler.work_due(svc, fresh, intact_since):  # stuck or lost: enqueue it again
            return fresh.model_copy(update={"lease_until": lease})
        changed = False
        return None  # nothing new, and the concept's work is in hand (or done)

    with dependencies("the object store"):
        records = [svc.store.put_photo(user_id, concept_id, v) for v in validated]
        # The broker's look comes before the lease, so that its epoch marker predates every
        # lease taken while its data lives (reconciler.message_lost). A broker that does not
        # answer gets no publish: the work is left due (no lease) for the reconciler.
        try:
            intact_since, broker_down = svc.task_queue.intact_since(), False
        except Unavailable:
            intact_since, broker_down = None, True
        if not broker_down:
            lease = reconciler.lease_from_now(svc.settings.celery.queued_lease_s)
        try:
            fresh = svc.store.update_manifest(user_id, concept_id, add)
        except DamagedManifestError as exc:  # damaged since our read
            raise refuse_damaged(exc) from None
    if fresh is None:
        raise NotFound(f"concept {concept_id!r} does not exist (deleted during the upload)")
    if changed:  # new photos, or a stuck concept taken over: enqueue its work
        try:
            if broker_down:
                raise Unavailable("the task queue is unavailable")
            reconciler.enqueue_for(svc, fresh)
        except Unavailable:
            if not broker_down:
                reconciler.release_lease(svc, user_id, concept_id)
            raise Unavailable("the photos are stored, but the task queue is unavailable: "
                              "processing starts by itself once it is back (sending them "
                              "again is harmless)") from None
    elif fresh.state == "ready" and (damaged := evidence.damaged_chunks(svc, fresh)):
        # Known photos sent again to a ready concept: a check of its chunks, repaired if any
        # is missing or fails verification (the user's way to ask for it; issue 30).
        log.warning("add_photos %s/%s: %d of its chunks missing or damaged; repair enqueued",
                    user_id, concept_id, len(damaged))
        evidence.enqueue_repair(svc, user_id, concept_id)
    log.info("add_photos %s/%s: %d given, %d new", user_id, concept_id, len(records), len(new))
    return fresh


def get_concept(svc: Services, user_id: str, concept_id: str) -> ConceptManifest:
    """The concept's manifest; NotFound when it does not exist; FAILED with a reason to delete
    it when its manifest is damaged."""
    return require_manifest(svc, user_id, concept_id)


def list_concepts(svc: Services, user_id: str) -> list[ConceptManifest]:
    """Every concept of the user, by concept id (one whose manifest is damaged as FAILED)."""
    check_ids(user_id)
    with dependencies("the object store"):
        return svc.store.read_manifests(user_id, on_damaged=damaged_concept)


def delete_concept(svc: Services, user_id: str, concept_id: str) -> bool:
    """Remove the concept everywhere (index, store, hot-chunk cache). Idempotent: returns
    whether it existed. Raises Unavailable when a dependency is down; retry then."""
    check_ids(user_id, concept_id)
    with dependencies("the index or the object store"):
        existed = svc.store.has_concept(user_id, concept_id)  # (readable or not)
        svc.index.delete_concept(user_id, concept_id)
        svc.store.delete_concept(user_id, concept_id)
    svc.chunk_cache.invalidate(user_id, concept_id)
    # Live conversations may hold its KV: the next turn rebuilds, and refuses without it.
    svc.conversations.drop(user_id)
    log.info("deleted concept %s/%s (existed: %s)", user_id, concept_id, existed)
    return existed


def delete_user(svc: Services, user_id: str) -> int:
    """Forget the user: every concept in the index, the store and the caches, and every
    conversation (records under the user's prefix, live KV). Idempotent;
    returns how many concepts existed."""
    check_ids(user_id)
    with dependencies("the index or the object store"):
        concepts = svc.store.list_concepts(user_id)
        svc.index.delete_user(user_id)
        svc.store.delete_user(user_id)
    svc.chunk_cache.invalidate(user_id)
    svc.conversations.drop(user_id)  # their records went with the user's prefix
    log.info("deleted user %s (%d concepts)", user_id, len(concepts))
    return len(concepts)
