"""The ingest pipeline behind the workers: mine a concept's patches, then cache its KV chunks.

``mine_concept`` runs in the ``mining`` worker (task ``mining.mine_concept``), ``cache_concept``
in the ``caching`` worker (``caching.cache_concept``); embedded mode runs both in-process.

Both are idempotent and safe to redeliver (acks_late: a task whose worker died runs again):

* mining only mines photos that have no patch yet, appending patches, so existing patch
  indices (and the chunks pointing at them) never move;
* caching derives every chunk id from content (sha256 over model, framing, owner, kind and the
  exact text or crop pixels) *before* running the model, and encodes only chunks the store does
  not hold yet - a redelivered task re-encodes nothing already stored, a new photo adds only its
  own chunks, and an object key can never be written with two different contents;
* the manifest is written after the blobs it names; index keys are written, and confirmed
  visible to every reader (``index_concept`` waits for it), before the concept turns
  ``ready``, so a ready concept is always findable, by an Ask in another process too.

Failures: a dependency outage raises ``Unavailable`` (the task is retried, the manifest keeps
its state); anything else marks the concept ``failed`` with a reason and re-raises.
"""

from __future__ import annotations

import dataclasses
import logging

from personalkv.kv.codec import ChunkFormatError, decode_chunk, encode_chunk
from personalkv.kv.engine import (
    Evidence, encode, evidence_chunk_id, patch_evidence, profile_evidence,
)
from personalkv.manifest import ChunkRecord, ConceptManifest
from personalkv.images import decode
from personalkv.mining.output import PhotoRef
from personalkv.mining.profile import profile_sentences
from personalkv.retrieval.indexing import index_concept
from personalkv.service import reconciler
from personalkv.service._common import check_ids, dependencies
from personalkv.service.errors import Unavailable
from personalkv.storage.chunk_store import MissingObjectsError

log = logging.getLogger(__name__)


def _write_state(svc, user_id: str, concept_id: str, state: str, **update) -> ConceptManifest | None:
    """Move the concept to ``state`` (compare-and-set on the freshest manifest) with a fresh
    lease; None when the concept no longer exists."""
    lease = reconciler.lease_from_now(svc.settings.celery.lease_s)
    with dependencies("the object store"):
        return svc.store.update_manifest(user_id, concept_id, lambda m: m.model_copy(
            update={"state": state, "lease_until": lease, **update}))


def _fail(svc, user_id: str, concept_id: str, exc: BaseException) -> None:
    reason = f"{type(exc).__name__}: {exc}"[:500]
    log.error("concept %s/%s failed: %s", user_id, concept_id, reason)
    try:
        svc.store.update_manifest(user_id, concept_id, lambda m: m.model_copy(update={
            "state": "failed", "failure_reason": reason, "lease_until": None}), check_objects=False)
    except Exception:  # the store may be what failed; the task's own error is what matters
        log.exception("could not record the failure of %s/%s", user_id, concept_id)


def _run(svc, user_id: str, concept_id: str, body):
    check_ids(user_id, concept_id)
    try:
        # The lease keeper renews the concept's lease while the task works: should this
        # process die, the reconciler sees the lease lapse and enqueues the work again.
        with dependencies("a dependency"), reconciler.LeaseKeeper(svc, user_id, concept_id):
            return body()
    except Unavailable:
        raise
    except Exception as exc:
        _fail(svc, user_id, concept_id, exc)
        raise


# -- mining --------------------------------------------------------------------------------
def mine_concept(svc, user_id: str, concept_id: str) -> ConceptManifest | None:
    """Mine patches for the photos that have none yet, update the profile, enqueue caching.
    Returns the manifest written, or None when the concept no longer exists."""
    return _run(svc, user_id, concept_id, lambda: _mine(svc, user_id, concept_id))


def _mine(svc, user_id: str, concept_id: str) -> ConceptManifest | None:
    manifest = _write_state(svc, user_id, concept_id, "mining", failure_reason=None)
    if manifest is None:
        log.info("mine %s/%s: concept deleted, nothing to do", user_id, concept_id)
        return None
    mined = {p.photo_id for p in manifest.patches}
    photos = {p.photo_id: decode(svc.store.get_photo(user_id, concept_id, p.photo_id))
              for p in manifest.photos}
    todo = {k: v for k, v in photos.items() if k not in mined}
    context = {k: v for k, v in photos.items() if k in mined}
    out = svc.miner(manifest, todo, settings=svc.settings.mining, context=context,
                    negatives=_other_concepts_photos(svc, user_id, concept_id),
                    descriptors=svc.descriptors, adapter=lambda: svc.adapter,
                    patches_per_photo=svc.settings.service.patches_per_photo)
    notes = {k: v for k, v in {"miner": out.miner, **out.notes}.items()
             if isinstance(v, (str, int, float, bool))}
    lease = reconciler.lease_from_now(svc.settings.celery.lease_s)
    added = 0
    arrived: set[str] = set()

    def merge(fresh: ConceptManifest) -> ConceptManifest:
        # Into the freshest manifest: photos may have been added while we mined. If so, they
        # need mining too: the concept stays queued (their upload enqueued mining; should that
        # have failed, the reconciler does) rather than moving on to caching without them.
        nonlocal added, arrived
        photo_ids = {p.photo_id for p in fresh.photos}
        arrived = photo_ids - set(photos)
        known = {(p.photo_id, p.box) for p in fresh.patches}
        new = [p for p in out.patches if p.photo_id in photo_ids and (p.photo_id, p.box) not in known]
        added = len(new)
        known = {(p.photo_id, p.box) for p in fresh.support}
        support = [p for p in out.support if p.photo_id in photo_ids and (p.photo_id, p.box) not in known]
        state = "queued" if arrived and fresh.state == "queued" else "caching"
        return fresh.model_copy(update={
            "patches": list(fresh.patches) + new, "support": list(fresh.support) + support,
            "profile": out.profile or fresh.profile, "mining_notes": notes,
            "state": state, "failure_reason": None,
            "lease_until": fresh.lease_until if state == "queued" else lease})

    with dependencies("the object store"):
        written = svc.store.update_manifest(user_id, concept_id, merge)
    if written is None:
        return None
    log.info("mined %s/%s: %d new photos -> %d patches (%s)%s", user_id, concept_id, len(todo),
             added, out.miner, f"; {len(arrived)} photos arrived meanwhile" if arrived else "")
    if written.state == "caching":
        svc.task_queue.enqueue_caching(user_id, concept_id)
    return written


def _other_concepts_photos(svc, user_id: str, concept_id: str) -> list[PhotoRef]:
    """Up to ``mining.user_negatives`` photos of the user's other concepts, round-robin across
    concepts so that each one counts: what this concept's patches must not look like. Only this
    user's objects are read, and a photo only when the miner lacks its stored descriptors."""
    limit = svc.settings.mining.user_negatives
    queues = []
    for other in sorted(svc.store.list_concepts(user_id)):
        if other == concept_id:
            continue
        m = svc.store.read_manifest(user_id, other)
        if m is not None and m.photos:
            queues.append((other, [p.photo_id for p in m.photos]))
    picked: list[tuple[str, str]] = []
    for depth in range(max((len(q) for _, q in queues), default=0)):
        picked += [(other, ids[depth]) for other, ids in queues if depth < len(ids)]
    return [PhotoRef(photo_id, other, lambda other=other, photo_id=photo_id:
                     decode(svc.store.get_photo(user_id, other, photo_id)))
            for other, photo_id in picked[:limit]]


# -- caching -------------------------------------------------------------------------------
def profile_chunk_evidence(profile) -> Evidence:
    """What a concept's profile chunk holds: its profile as a few clean sentences. The QA
    evaluation (personalkv.evaluation.qa) encodes exactly this."""
    return profile_evidence(profile_sentences(profile))


def cache_concept(svc, user_id: str, concept_id: str) -> ConceptManifest | None:
    """Encode and store the chunks the concept lacks, index its keys, mark it ready.
    Returns the manifest written, or None when the concept no longer exists."""
    return _run(svc, user_id, concept_id, lambda: _cache(svc, user_id, concept_id))


def _record(chunk_id: str, kind: str, source: str, meta: dict, key: str) -> ChunkRecord:
    return ChunkRecord(
        chunk_id=chunk_id, kind=kind, object_key=key, token_count=int(meta["token_count"]),
        position_extent=int(meta["position_extent"]) - int(meta["start_position"]),
        model_fingerprint=meta["model_fingerprint"], source=source,
    )


def _cache(svc, user_id: str, concept_id: str) -> ConceptManifest | None:
    manifest = svc.store.read_manifest(user_id, concept_id)
    if manifest is None:
        log.info("cache %s/%s: concept deleted, nothing to do", user_id, concept_id)
        return None
    adapter = svc.adapter
    fingerprint = adapter.fingerprint()
    quantization = svc.settings.model.chunk_quantization
    store = svc.store
    known = {c.chunk_id: c for c in manifest.chunks}
    if manifest.state not in ("caching", "queued", "mining"):
        # (queued / mining: photos are waiting for mining, which enqueues caching after it;
        # that state stays so that a lapsed lease sends the concept back to mining.)
        manifest = _write_state(svc, user_id, concept_id, "caching", failure_reason=None)
        if manifest is None:
            return None
    encoded = reused = 0

    def chunk_for(evidence) -> ChunkRecord:
        nonlocal encoded, reused
        kind, source = evidence.kind, evidence.source
        chunk_id = evidence_chunk_id(adapter, evidence, user_id=user_id, concept_id=concept_id)
        key = store.chunk_key(user_id, concept_id, chunk_id)
        if chunk_id in known and known[chunk_id].kind == kind:
            reused += 1
            return known[chunk_id].model_copy(update={"source": source})
        if store.has_chunk(user_id, concept_id, chunk_id):
            # Stored by an earlier run that died before its manifest write: verify, don't redo
            # (a blob that fails verification is encoded again and overwritten).
            try:
                meta = decode_chunk(store.get_chunk(user_id, concept_id, chunk_id),
                                    expected_model=fingerprint, expected_user=user_id,
                                    expected_chunk_id=chunk_id).meta
                reused += 1
                return _record(chunk_id, kind, source, dataclasses.asdict(meta), key)
            except ChunkFormatError as exc:
                log.warning("stored chunk %s of %s/%s is unusable (%s); encoding it again",
                            chunk_id[:12], user_id, concept_id, exc)
        chunk = encode(adapter, evidence, user_id=user_id, concept_id=concept_id)
        assert chunk.chunk_id == chunk_id, "content hash drifted between planning and encoding"
        store.put_chunk(user_id, concept_id, chunk_id, encode_chunk(chunk, quantization))
        encoded += 1
        return _record(chunk_id, kind, source, dataclasses.asdict(chunk.meta), key)

    records = [chunk_for(profile_chunk_evidence(manifest.profile))]
    photos: dict = {}
    seen = {records[0].chunk_id}
    # A text-only model gets the profile chunk alone; its photos still serve retrieval.
    patches = manifest.patches if adapter.supports_images else []
    for i, patch in enumerate(patches):
        if patch.photo_id not in photos:
            photos[patch.photo_id] = decode(store.get_photo(user_id, concept_id, patch.photo_id))
        crop = photos[patch.photo_id].crop(patch.box)
        record = chunk_for(patch_evidence(crop, manifest.profile.name, source=str(i)))
        if record.chunk_id not in seen:  # two identical patches share one chunk
            seen.add(record.chunk_id)
            records.append(record)

    superseded = False

    def unchanged(fresh: ConceptManifest) -> bool:
        nonlocal superseded
        superseded = fresh.patches != manifest.patches or fresh.profile != manifest.profile
        return not superseded

    def keep_state(fresh: ConceptManifest) -> str:
        # Photos uploaded meanwhile (queued) or being mined: that state, not ours, is current.
        return fresh.state if fresh.state in ("queued", "mining") else "caching"

    try:
        with dependencies("the object store"):
            staged = store.update_manifest(user_id, concept_id, lambda fresh: fresh.model_copy(
                update={"chunks": records, "model_fingerprint": fingerprint,
                        "state": keep_state(fresh), "failure_reason": None})
                if unchanged(fresh) else None)
        if staged is None:
            return None
        if superseded:
            # Re-mined meanwhile: the caching task that mining enqueued will finish with the
            # chunks stored here already in place. Nothing to publish from this run.
            log.info("cache %s/%s superseded by newer mining; %d chunks stored", user_id,
                     concept_id, encoded)
            return staged
        index_concept(svc.index, svc.keys, staged,
                      lambda photo_id: store.get_photo(user_id, concept_id, photo_id))
        with dependencies("the object store"):
            ready = store.update_manifest(user_id, concept_id, lambda fresh: fresh.model_copy(
                update={"state": "ready", "lease_until": None})
                if fresh.state == "caching" and fresh.chunks == records else None)
    except MissingObjectsError:
        if store.read_manifest(user_id, concept_id) is None:
            # Deleted while we published: take back any keys we wrote, then stop.
            svc.index.delete_concept(user_id, concept_id)
            log.info("cache %s/%s: concept deleted meanwhile", user_id, concept_id)
            return None
        raise
    if ready is None:  # deleted after the index write
        svc.index.delete_concept(user_id, concept_id)
        return None
    # Chunks the previous manifest named and this one does not (new profile, new model).
    current = {r.chunk_id for r in records}
    for stale in set(known) - current:
        try:
            store.objects.delete(store.chunk_key(user_id, concept_id, stale))
        except Exception:
            log.warning("could not delete stale chunk %s of %s/%s", stale[:12], user_id, concept_id)
    log.info("cached %s/%s: %d chunks (%d encoded, %d reused); ready", user_id, concept_id,
             len(records), encoded, reused)
    return ready

