"""Leases on a concept's background work, and the reconciler that re-enqueues lapsed ones.

A concept in ``queued``, ``mining`` or ``caching`` carries ``lease_until`` in its manifest: until
then its work is known to be in hand. Who sets it:

* ``concepts.add_photos`` (and the reconciler) when they enqueue: ``queued_lease_s`` ahead, the
  time a message may wait in the broker; if the publish fails, the lease is cleared so that the
  work is due at once;
* the pipeline when a worker starts mining or caching (``lease_s`` ahead), and a ``LeaseKeeper``
  thread that renews it every ``lease_s / 3`` while the task runs.

A worker that dies (SIGKILL, node loss, OOM) stops renewing; ``lease_s`` later the concept is
due. ``reconcile`` finds due concepts, claims each one with a compare-and-set manifest update
(the lease moves ``queued_lease_s`` ahead, so of several reconcilers exactly one enqueues it) and
enqueues the task its state needs (queued, mining -> mining; caching -> caching). Tasks are
idempotent by content, so a duplicate (the broker redelivering the dead worker's message after
its visibility timeout) costs time, not data. A ``Reconciler`` thread runs a pass on start and
every ``reconcile_interval_s`` in every worker process and in the ingestion server, so a stuck
concept finishes within about lease_s + reconcile_interval_s + the task's own time, however
long the broker's visibility timeout is.

**A broker that lost its data** (Redis restarted without persistence, a FLUSHALL, a failover to
a replica that had not received the messages) loses the tasks of concepts in ``queued`` while
their ``queued_lease_s`` (600 s) still runs. The task queue port answers ``intact_since()``:
when the broker's current data set began. A queued concept whose lease was taken (published:
``lease_until - queued_lease_s``) before then lost its task and is due at once, in a reconciler
pass and for ``add_photos`` (sending the same photos again enqueues it). Both look at the
broker before they take a lease, so the marker (below) predates every lease taken while its
data lives, and a lease taken before it was published into data now gone. Hosts' clocks must
agree (NTP) to better than a restart's gap (from the lease to the first look after the
restart, the broker's downtime included); a larger skew errs as described below. So after a
restart the work is enqueued again within one ``reconcile_interval_s`` (20 s), not after the
600 s lease. (``mining`` and ``caching`` keep the
short ``lease_s``: a worker holds their task, or mining enqueued caching a moment ago.)

The Celery adapter keeps a marker key in the broker (``personalkv:broker-epoch``, the time of
the first look after it was found missing, written only if absent) rather than the
alternatives, because the marker shares the fate of the queued messages and nothing else:

* Redis' own start (``INFO server`` ``run_id`` / ``uptime_in_seconds``) changes on every
  restart, also when AOF kept the queues (every queued concept would be re-sent), does not
  change on a FLUSHALL, differs on a promoted replica that holds the data, and ``INFO`` is
  refused by some proxies and managed services; the marker needs only SET and GET.
* Looking for the task in the broker (the queue list, Celery's ``unacked`` hash, a worker's
  reserved or ETA tasks) depends on the transport's private layout, costs a scan of the whole
  queue per pass, and races a worker between BRPOP and its ``unacked`` write.
* The marker errs towards a duplicate task (the marker evicted; a clock behind the marker's),
  which the tasks' idempotence makes harmless, or towards the lease (a clock ahead). Where it
  cannot tell (another transport, the broker down, the in-process queue, a Celery failover
  list of independent Redis servers switching back to one with an old marker) the leases
  decide, as before.
Every process must run with the same ``queued_lease_s`` (the publish time is read back from it).

A pass reads only the concepts in flight: the store's work ledger (``ChunkStore.work_key``, one
entry per concept in ``queued``/``mining``/``caching``, written before a manifest enters those
states and removed after it leaves them) is one LIST, then one GET per entry, so a pass costs
what is in flight, not the number of concepts (a test counts the reads: 10k ready concepts and
10 in flight). A store from before the ledger gets one full scan (one LIST per user and a GET per
concept) that builds it. A stale entry (a writer crashed between the manifest and the ledger)
names an idle concept; it is removed once older than ``STALE_WORK_S``. One concept never stops
a pass: a damaged manifest (or any error but an outage) on one concept is
logged, counted in ``personalkv_reconciler_skipped_total{reason}`` and skipped; only
``Unavailable`` (the broker or the store is down) ends the pass.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

from prometheus_client import Counter

from personalkv.manifest import IN_FLIGHT_STATES, ConceptManifest
from personalkv.service_layer._common import transient_errors
from personalkv.errors import Unavailable
from personalkv.service_layer.services import Services
from personalkv.storage.chunk_store import DamagedManifestError

log = logging.getLogger(__name__)

ACTIVE_STATES = IN_FLIGHT_STATES
#: A ledger entry whose concept is idle is removed once this old (its writer publishes the
#: manifest right after writing the entry; a younger one may be a concept entering flight).
STALE_WORK_S = 120.0

# Defined here, not in personalkv.observability (which reaches Celery, and the use cases must
# not): it is in the same default registry, exported by every process's /metrics endpoint.
RECONCILER_SKIPPED = Counter(
    "personalkv_reconciler_skipped_total",
    "Concepts a reconciler pass skipped (it carried on with the others), by reason.", ["reason"],
)  # fmt: skip


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def lease_lapsed(manifest: ConceptManifest, now: datetime | None = None) -> bool:
    """Whether the concept waits for work that nobody has in hand (no lease, or lease past).
    A queued concept without photos waits for its photos, not for work: it stays queued."""
    if manifest.state not in ACTIVE_STATES or (manifest.state == "queued" and not manifest.photos):
        return False
    return manifest.lease_until is None or manifest.lease_until <= (now or utcnow())


def message_lost(manifest: ConceptManifest, intact_since: datetime | None,
                 queued_lease_s: float) -> bool:
    """Whether a queued concept's task was published before the broker's current data set
    began (``TaskQueue.intact_since``), so that it is no longer in the broker. The publish time
    is when the queued lease was taken: ``lease_until - queued_lease_s``."""
    if (intact_since is None or manifest.state != "queued" or not manifest.photos
            or manifest.lease_until is None):
        return False
    enqueued_at = manifest.lease_until - timedelta(seconds=queued_lease_s)
    return enqueued_at < intact_since


def work_due(svc: Services, manifest: ConceptManifest, intact_since: datetime | None,
             now: datetime | None = None) -> bool:
    """Whether the concept's work must be enqueued (again): its lease lapsed, or its queued
    task was lost with the broker's data."""
    return lease_lapsed(manifest, now) or message_lost(
        manifest, intact_since, svc.settings.celery.queued_lease_s)


def broker_intact_since(svc: Services) -> datetime | None:
    """``svc.task_queue.intact_since()``, or None (leases alone decide) when the broker does
    not answer: then nothing can be enqueued anyway, and the next look tells."""
    try:
        return svc.task_queue.intact_since()
    except Unavailable:
        return None


def lease_from_now(seconds: float) -> datetime:
    return utcnow() + timedelta(seconds=seconds)


def enqueue_for(svc: Services, manifest: ConceptManifest) -> str:
    """Enqueue the task the concept's state needs; returns its queue name."""
    if manifest.state == "caching":
        svc.task_queue.enqueue_caching(manifest.user_id, manifest.concept_id)
        return "caching"
    svc.task_queue.enqueue_mining(manifest.user_id, manifest.concept_id)
    return "mining"


def release_lease(svc: Services, user_id: str, concept_id: str) -> None:
    """Best effort, after a failed enqueue: clear the lease so the next reconciler pass
    enqueues the concept (nothing else would, as no message is in the broker)."""
    try:
        svc.store.update_manifest(
            user_id, concept_id,
            lambda m: m.model_copy(update={"lease_until": None}) if m.state in ACTIVE_STATES else None,
            check_objects=False)
    except Exception:  # the store may be down too; an expired lease lapses by itself
        log.warning("could not release the lease of %s/%s", user_id, concept_id, exc_info=True)


def claim_and_enqueue(svc: Services, user_id: str, concept_id: str,
                      intact_since: datetime | None = None) -> str | None:
    """If the concept's work is due (``work_due``), take its lease (compare-and-set) and
    enqueue its task; returns the queue, or None when there was nothing to do (or another
    reconciler took it)."""
    claimed = False

    def claim(m: ConceptManifest):
        nonlocal claimed
        claimed = work_due(svc, m, intact_since)
        if not claimed:
            return None
        return m.model_copy(update={"lease_until": lease_from_now(svc.settings.celery.queued_lease_s)})

    manifest = svc.store.update_manifest(user_id, concept_id, claim, check_objects=False)
    if manifest is None or not claimed:
        return None
    try:
        return enqueue_for(svc, manifest)
    except Unavailable:
        release_lease(svc, user_id, concept_id)
        raise


def reconcile(svc: Services) -> list[tuple[str, str, str]]:
    """One pass over the concepts in flight: enqueue those whose work is due (lease lapsed, or task lost
    with the broker's data). Returns (user, concept, queue) of each concept enqueued. A concept
    that cannot be handled (damaged manifest, any error but an outage) is skipped and reported
    (``skipped``); the pass stops at the first outage (Unavailable, or the store's or index's
    transient errors: the next pass tries again)."""
    done = []
    intact_since = broker_intact_since(svc)
    now = utcnow()

    def damaged(error: DamagedManifestError) -> None:
        skipped(error.user_id, error.concept_id, "damaged_manifest")

    for manifest in _in_flight(svc, now, damaged):
        user_id = manifest.user_id
        if not work_due(svc, manifest, intact_since, now):
            continue
        concept_id = manifest.concept_id
        lost = not lease_lapsed(manifest, now)
        try:
            queue = claim_and_enqueue(svc, user_id, concept_id, intact_since)
        except (Unavailable, *transient_errors()):
            raise
        except DamagedManifestError:  # damaged since the listing read it
            skipped(user_id, concept_id, "damaged_manifest")
            continue
        except Exception:
            skipped(user_id, concept_id, "error", exc_info=True)
            continue
        if queue is not None:
            log.warning("concept %s/%s was %s with %s; enqueued %s again", user_id,
                        concept_id, manifest.state, "its task lost with the broker's data"
                        if lost else "its lease lapsed", queue)
            done.append((user_id, concept_id, queue))
    return done


def _in_flight(svc: Services, now: datetime, damaged) -> Iterator[ConceptManifest]:
    """The manifests of the concepts in flight: from the work ledger, or (a store from before
    it) from a full scan that builds it. Removes stale ledger entries on the way."""
    store = svc.store
    if not store.ledger_complete():
        for user_id in store.list_users():
            for manifest in store.read_manifests(user_id, on_damaged=damaged):
                if manifest.in_flight:
                    store.add_work(user_id, manifest.concept_id)
                    yield manifest
        store.mark_ledger_complete()
        return
    for user_id, concept_id in store.work_in_flight():
        try:
            manifest = store.read_manifest(user_id, concept_id)
        except DamagedManifestError as error:
            damaged(error)
            continue
        if manifest is not None and manifest.in_flight:
            yield manifest
            continue
        written = store.work_entry_time(user_id, concept_id)
        if written is None or (now - written).total_seconds() > STALE_WORK_S:
            store.drop_work(user_id, concept_id)


def skipped(user_id: str, concept_id: str, reason: str, exc_info: bool = False) -> None:
    """Report a concept a pass could not handle (log and counter); the pass carries on."""
    RECONCILER_SKIPPED.labels(reason).inc()
    log.warning("reconciler skipped concept %s/%s (%s); it carries on with the others",
                user_id, concept_id, reason, exc_info=exc_info)


class Reconciler:
    """A daemon thread running ``reconcile`` at start and every ``interval_s`` seconds."""

    def __init__(self, svc: Services, interval_s: float | None = None) -> None:
        self.svc = svc
        self.interval_s = svc.settings.celery.reconcile_interval_s if interval_s is None else interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Reconciler:
        if self.interval_s > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pkv-reconciler", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                reconcile(self.svc)
            except Exception as exc:  # a dependency is down: try again next interval
                log.warning("reconciler pass failed: %s: %s", type(exc).__name__, exc)
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class LeaseKeeper:
    """Renews a concept's lease every ``lease_s / 3`` while a task works on it (context manager).
    It only moves ``lease_until`` forward and only while the concept is in an active state."""

    def __init__(self, svc: Services, user_id: str, concept_id: str) -> None:
        self.svc, self.user_id, self.concept_id = svc, user_id, concept_id
        self.lease_s = svc.settings.celery.lease_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pkv-lease", daemon=True)

    def renew(self) -> None:
        until = lease_from_now(self.lease_s)

        def extend(m: ConceptManifest):
            if m.state not in ACTIVE_STATES or (m.lease_until and m.lease_until >= until):
                return None
            return m.model_copy(update={"lease_until": until})

        self.svc.store.update_manifest(self.user_id, self.concept_id, extend, check_objects=False)

    def _run(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                self.renew()
            except Exception as exc:  # next renewal may succeed; the lease has slack for two
                log.warning("could not renew the lease of %s/%s: %s", self.user_id,
                            self.concept_id, exc)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
