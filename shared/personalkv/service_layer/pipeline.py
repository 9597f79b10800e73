"""The ingest pipeline behind the workers: mine a concept's patches, then cache its KV chunks.

``mine_concept`` runs in the ``mining`` worker (task ``mining.mine_concept``), ``cache_concept``
in the ``caching`` worker (``caching.cache_concept``); embedded mode runs both in-process.

Both are idempotent and safe to redeliver (acks_late: a task whose worker died runs again):

* mining only mines photos that have no patch yet, appending patches, so existing patch
  indices (and the chunks pointing at them) never move;
* caching derives every chunk id from content (sha256 over model, framing, owner, kind and the
  exact text or crop pixels) *before* running the model, and encodes only chunks the store does
  not hold in a form that verifies - a redelivered task re-encodes nothing already stored, a new
  photo adds only its own chunks, and an object key can never be written with two different
  contents. Every stored chunk is read back and verified (``decode_chunk``: checksum, owner,
  model, id) before it is reused, so a blob that was tampered with or lost is encoded again:
  any caching run repairs it (an upload of a new photo, or ``personalkv recache``);
* the manifest is written after the blobs it names; index keys are written, and confirmed
  visible to every reader (``index_concept`` waits for it), before the concept turns
  ``ready``, so a ready concept is always findable, by an Ask in another process too.

Failures: a dependency outage raises ``Unavailable`` (the task is retried, the manifest keeps
its state); anything else marks the concept ``failed`` with a reason and re-raises. The reason
is shown to clients: it names the stage and what to do, never an object key or an exception
class (those go to the worker's log).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Iterator

from PIL import Image

from personalkv.kv.chunk import ChunkMeta
from personalkv.kv.codec import ChunkFormatError, decode_chunk, encode_chunk
from personalkv.kv.engine import encode
from personalkv.kv.evidence import (
    Evidence, evidence_chunk_id, patch_evidence, profile_chunk_evidence,
)
from personalkv.chunk_ref import ChunkRef
from personalkv.manifest import ConceptManifest
from personalkv.images import decode
from personalkv.mining.output import PhotoRef
from personalkv.retrieval.indexing import index_concept
from personalkv.service_layer import reconciler
from personalkv.service_layer._common import check_ids, dependencies
from personalkv.errors import ServiceError, Unavailable
from personalkv.storage.base import ObjectNotFound
from personalkv.storage.chunk_store import DamagedManifestError, MissingObjectsError
from personalkv.service_layer.services import Services

log = logging.getLogger(__name__)


def _write_state(svc: Services, user_id: str, concept_id: str, state: str, **update) -> ConceptManifest | None:
    """Move the concept to ``state`` (compare-and-set on the freshest manifest) with a fresh
    lease; None when the concept no longer exists. Names no new object, so the objects are not
    checked: a chunk lost from a ready concept must not stop the caching run that repairs it."""
    lease = reconciler.lease_from_now(svc.settings.celery.lease_s)
    with dependencies("the object store"):
        return svc.store.update_manifest(user_id, concept_id, lambda m: m.model_copy(
            update={"state": state, "lease_until": lease, **update}), check_objects=False)


def _fail(svc: Services, user_id: str, concept_id: str, stage: str, exc: BaseException) -> None:
    if isinstance(exc, ServiceError):  # its message is written for the caller
        reason = f"{stage} failed: {exc.message}"[:500]
    else:
        reason = f"{stage} failed on an internal error; sending the photos again retries it"
    log.error("concept %s/%s failed in %s", user_id, concept_id, stage, exc_info=exc)
    try:
        svc.store.update_manifest(user_id, concept_id, lambda m: m.model_copy(update={
            "state": "failed", "failure_reason": reason, "lease_until": None}), check_objects=False)
    except Exception:  # the store may be what failed; the task's own error is what matters
        log.exception("could not record the failure of %s/%s", user_id, concept_id)


def _run(svc: Services, user_id: str, concept_id: str, stage: str, body):
    check_ids(user_id, concept_id)
    try:
        # The lease keeper renews the concept's lease while the task works: should this
        # process die, the reconciler sees the lease lapse and enqueues the work again.
        with dependencies("a dependency"), reconciler.LeaseKeeper(svc, user_id, concept_id):
            return body()
    except Unavailable:
        raise
    except DamagedManifestError:
        # Nothing to do and nowhere to record a failure: clients see the concept FAILED
        # (service_layer._common.damaged_concept) until it is deleted.
        log.warning("concept %s/%s: its manifest is damaged; task dropped", user_id, concept_id)
        return None
    except Exception as exc:
        _fail(svc, user_id, concept_id, stage, exc)
        raise


# -- mining --------------------------------------------------------------------------------
def mine_concept(svc: Services, user_id: str, concept_id: str) -> ConceptManifest | None:
    """Mine patches for the photos that have none yet, update the profile, enqueue caching.
    Returns the manifest written, or None when the concept no longer exists."""
    return _run(svc, user_id, concept_id, "mining", lambda: _mine(svc, user_id, concept_id))


def _mine(svc: Services, user_id: str, concept_id: str) -> ConceptManifest | None:
    current = svc.store.read_manifest(user_id, concept_id)
    if current is not None and not current.photos:
        # Nothing to mine (a task enqueued by hand, or by an older reconciler): a concept
        # stays queued until its photos arrive, as the API promises.
        log.info("mine %s/%s: no photos yet; stays %s", user_id, concept_id, current.state)
        return current
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


def _other_concepts_photos(svc: Services, user_id: str, concept_id: str) -> list[PhotoRef]:
    """Up to ``mining.user_negatives`` photos of the user's other concepts, round-robin across
    concepts so that each one counts: what this concept's patches must not look like. Only this
    user's objects are read, and a photo only when the miner lacks its stored descriptors."""
    limit = svc.settings.mining.user_negatives
    queues = [(m.concept_id, [p.photo_id for p in m.photos])
              for m in svc.store.read_manifests(user_id)  # a damaged one is skipped
              if m.concept_id != concept_id and m.photos]
    picked: list[tuple[str, str]] = []
    for depth in range(max((len(q) for _, q in queues), default=0)):
        picked += [(other, ids[depth]) for other, ids in queues if depth < len(ids)]
    return [PhotoRef(photo_id, other, lambda other=other, photo_id=photo_id:
                     decode(svc.store.get_photo(user_id, other, photo_id)))
            for other, photo_id in picked[:limit]]


# -- caching -------------------------------------------------------------------------------
# One run: enter the caching state, plan the evidence, store the chunks it lacks (encoding
# only what is not stored yet), stage them in the manifest unless mining superseded this run,
# publish (index keys, then ``ready``), and delete the chunks the manifest stopped naming.
def cache_concept(svc: Services, user_id: str, concept_id: str) -> ConceptManifest | None:
    """Encode and store the chunks the concept lacks, index its keys, mark it ready.
    Returns the manifest written, or None when the concept no longer exists."""
    return _run(svc, user_id, concept_id, "caching", lambda: _cache(svc, user_id, concept_id))


def _cache(svc: Services, user_id: str, concept_id: str) -> ConceptManifest | None:
    manifest = svc.store.read_manifest(user_id, concept_id)
    if manifest is None:
        log.info("cache %s/%s: concept deleted, nothing to do", user_id, concept_id)
        return None
    known = {c.chunk_id: c for c in manifest.chunks}
    manifest = _enter_caching(svc, manifest)
    if manifest is None:
        return None
    writer = _ChunkWriter(svc, user_id, concept_id, known)
    photos = _photo_loader(svc, user_id, concept_id)
    records = _store_chunks(writer, _plan_evidence(svc, manifest, photos))
    try:
        staged, superseded = _stage_chunks(svc, manifest, records, writer.fingerprint)
        if staged is None:
            return None
        if superseded:
            # Re-mined meanwhile: the caching task that mining enqueued will finish with the
            # chunks stored here already in place. Nothing to publish from this run.
            log.info("cache %s/%s superseded by newer mining; %d chunks stored", user_id,
                     concept_id, writer.encoded)
            return staged
        ready = _publish(svc, staged, records, photos)
    except MissingObjectsError:
        if svc.store.read_manifest(user_id, concept_id) is None:
            # Deleted while we published: take back any keys we wrote, then stop.
            svc.index.delete_concept(user_id, concept_id)
            log.info("cache %s/%s: concept deleted meanwhile", user_id, concept_id)
            return None
        raise
    if ready is None:  # deleted after the index write
        svc.index.delete_concept(user_id, concept_id)
        return None
    # Chunks the previous manifest named and this one does not (new profile, new model).
    _delete_stale_chunks(svc.store, user_id, concept_id, set(known) - {r.chunk_id for r in records})
    log.info("cached %s/%s: %d chunks (%d encoded, of which %d repairs; %d reused); ready",
             user_id, concept_id, len(records), writer.encoded, writer.repaired, writer.reused)
    return ready


def _enter_caching(svc: Services, manifest: ConceptManifest) -> ConceptManifest | None:
    """The manifest in a state that lets caching run; None when the concept is gone."""
    if manifest.state in ("caching", "queued", "mining"):
        # (queued / mining: photos are waiting for mining, which enqueues caching after it;
        # that state stays so that a lapsed lease sends the concept back to mining.)
        return manifest
    return _write_state(svc, manifest.user_id, manifest.concept_id, "caching", failure_reason=None)


def _photo_loader(svc: Services, user_id: str, concept_id: str) -> Callable[[str], Image.Image]:
    """The concept's photos, each fetched and decoded at most once per caching run: its patch
    crops (the chunks) and its index keys take the same decoded image."""

    @functools.cache
    def load(photo_id: str) -> Image.Image:
        return decode(svc.store.get_photo(user_id, concept_id, photo_id))

    return load


def _plan_evidence(svc: Services, manifest: ConceptManifest,
                   photos: Callable[[str], Image.Image]) -> Iterator[Evidence]:
    """The evidence the concept's chunks hold, in placement order: the profile, then each
    patch (cropped from ``photos``, the run's decoded photos)."""
    yield profile_chunk_evidence(manifest.profile)
    # A text-only model gets the profile chunk alone; its photos still serve retrieval.
    patches = manifest.patches if svc.adapter.supports_images else []
    for i, patch in enumerate(patches):
        crop = photos(patch.photo_id).crop(patch.box)
        yield patch_evidence(crop, manifest.profile.name, source=str(i))


class _ChunkWriter:
    """Makes sure one piece of evidence has its chunk stored, and returns its record: the
    stored blob when it verifies (whether the manifest named it or an earlier run that died
    stored it), else encoded and written now (``repaired`` counts the chunks the manifest named
    whose blob was missing or refused)."""

    def __init__(self, svc: Services, user_id: str, concept_id: str, known: dict[str, ChunkRef]) -> None:
        self.store, self.adapter = svc.store, svc.adapter
        self.fingerprint = self.adapter.fingerprint()
        self.quantization = svc.settings.model.chunk_quantization
        self.user_id, self.concept_id, self.known = user_id, concept_id, known
        self.encoded = self.reused = self.repaired = 0

    def record_for(self, evidence: Evidence) -> ChunkRef:
        user_id, concept_id, store = self.user_id, self.concept_id, self.store
        chunk_id = evidence_chunk_id(self.adapter, evidence, user_id=user_id, concept_id=concept_id)
        # Verified, not trusted: reading a chunk back costs far less than encoding it, and this
        # is the one place a tampered or lost blob gets repaired (the Ask path only skips it).
        try:
            blob = store.get_chunk(user_id, concept_id, chunk_id)
        except ObjectNotFound:
            blob = None
            if chunk_id in self.known:
                self.repaired += 1
                log.warning("chunk %s of %s/%s is missing; encoding it again", chunk_id[:12],
                            user_id, concept_id)
        if blob is not None:
            try:
                meta = decode_chunk(blob, expected_model=self.fingerprint, expected_user=user_id,
                                    expected_chunk_id=chunk_id).meta
                self.reused += 1
                return self._record(evidence, meta)
            except ChunkFormatError as exc:
                self.repaired += 1
                log.warning("stored chunk %s of %s/%s is refused (%s); encoding it again",
                            chunk_id[:12], user_id, concept_id, exc)
        chunk = encode(self.adapter, evidence, user_id=user_id, concept_id=concept_id)
        assert chunk.chunk_id == chunk_id, "content hash drifted between planning and encoding"
        store.put_chunk(user_id, concept_id, chunk_id, encode_chunk(chunk, self.quantization))
        self.encoded += 1
        return self._record(evidence, chunk.meta)

    def _record(self, evidence: Evidence, meta: ChunkMeta) -> ChunkRef:
        return ChunkRef(
            chunk_id=meta.chunk_id, kind=evidence.kind,
            object_key=self.store.chunk_key(self.user_id, self.concept_id, meta.chunk_id),
            token_count=meta.token_count, position_span=meta.position_span,
            model_fingerprint=meta.model_fingerprint, source=evidence.source,
        )


def _store_chunks(writer: _ChunkWriter, evidence: Iterable[Evidence]) -> list[ChunkRef]:
    """Every piece of evidence's chunk stored; one record per distinct chunk, in order."""
    records: list[ChunkRef] = []
    seen: set[str] = set()
    for piece in evidence:
        record = writer.record_for(piece)
        if record.chunk_id not in seen:  # two identical patches share one chunk
            seen.add(record.chunk_id)
            records.append(record)
    return records


def _stage_chunks(svc: Services, planned: ConceptManifest, records: list[ChunkRef],
                  fingerprint: str) -> tuple[ConceptManifest | None, bool]:
    """Compare-and-set the chunk records into the freshest manifest unless its patches or
    profile changed since ``planned`` (then it is left alone: superseded). Returns the manifest
    (None when the concept is gone) and whether this run was superseded."""
    superseded = False

    def unchanged(fresh: ConceptManifest) -> bool:
        nonlocal superseded
        superseded = fresh.patches != planned.patches or fresh.profile != planned.profile
        return not superseded

    def keep_state(fresh: ConceptManifest) -> str:
        # Photos uploaded meanwhile (queued) or being mined: that state, not ours, is current.
        return fresh.state if fresh.state in ("queued", "mining") else "caching"

    with dependencies("the object store"):
        staged = svc.store.update_manifest(planned.user_id, planned.concept_id, lambda fresh: fresh.model_copy(
            update={"chunks": records, "model_fingerprint": fingerprint,
                    "state": keep_state(fresh), "failure_reason": None})
            if unchanged(fresh) else None)
    return staged, superseded


def _publish(svc: Services, staged: ConceptManifest, records: list[ChunkRef],
             photos: Callable[[str], Image.Image]) -> ConceptManifest | None:
    """Index the staged concept's keys (visible to every reader), then compare-and-set it
    ``ready`` if it is still caching these very chunks; None when it is not."""
    user_id, concept_id = staged.user_id, staged.concept_id
    index_concept(svc.index, svc.keys, staged, photos)
    with dependencies("the object store"):
        return svc.store.update_manifest(user_id, concept_id, lambda fresh: fresh.model_copy(
            update={"state": "ready", "lease_until": None})
            if fresh.state == "caching" and fresh.chunks == records else None)


def _delete_stale_chunks(store, user_id: str, concept_id: str, stale: set[str]) -> None:
    """Best effort: a chunk left behind costs space, not correctness (no manifest names it)."""
    for chunk_id in stale:
        try:
            store.delete_chunk(user_id, concept_id, chunk_id)
        except Exception:
            log.warning("could not delete stale chunk %s of %s/%s", chunk_id[:12], user_id, concept_id)
