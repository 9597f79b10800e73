"""Leases and the reconciler, in one process (local store, the in-memory index, tiny Qwen2-VL,
tasks inline): a concept whose worker died (state mining/caching, lease lapsed) is enqueued again by a
reconciler pass or by re-uploading a photo it already has; a live lease is left alone; a
claimed concept is enqueued once; the lease keeper moves the lease forward while a task runs."""

from __future__ import annotations

import time
from datetime import timedelta

from personalkv.bootstrap import task_handlers
from personalkv.service_layer import concepts, reconciler

BLUE = (30, 60, 200)


def _stuck(svc, photo_of, concept: str, state: str, lapsed: bool = True):
    """A concept left in `state` by a worker that died: photos stored, lease lapsed (or not)."""
    concepts.create_concept(svc, "alice", concept, "Bobo", "mug", "blue mug")
    record = svc.store.put_photo("alice", concept, photo_of(BLUE, 1))
    lease = reconciler.utcnow() + timedelta(seconds=-5 if lapsed else 600)
    m = concepts.get_concept(svc, "alice", concept)
    svc.store.write_manifest(m.model_copy(update={"state": state, "photos": [record],
                                                  "lease_until": lease}))
    return record


def test_a_reconciler_pass_finishes_lapsed_concepts_and_leaves_live_ones(svc, photo_of):
    _stuck(svc, photo_of, "mined", "mining")
    _stuck(svc, photo_of, "busy", "mining", lapsed=False)  # a live worker has it
    assert reconciler.lease_lapsed(concepts.get_concept(svc, "alice", "mined"))
    done = reconciler.reconcile(svc)  # the synchronous queue runs the work inline
    assert done == [("alice", "mined", "mining")]
    assert concepts.get_concept(svc, "alice", "mined").state == "ready"
    busy = concepts.get_concept(svc, "alice", "busy")
    assert busy.state == "mining" and not reconciler.lease_lapsed(busy)
    assert reconciler.reconcile(svc) == []  # nothing lapsed any more


def test_a_claimed_concept_is_enqueued_once(svc, photo_of):
    _stuck(svc, photo_of, "mug", "queued")

    class Counting(type(svc.task_queue)):
        calls = 0

        def enqueue_mining(self, user_id, concept_id):
            Counting.calls += 1

    svc.task_queue = Counting(synchronous=True)
    svc.task_queue.bind(task_handlers(svc))
    assert reconciler.claim_and_enqueue(svc, "alice", "mug") == "mining"
    assert reconciler.claim_and_enqueue(svc, "alice", "mug") is None  # the lease is taken
    assert Counting.calls == 1


def test_reuploading_a_known_photo_to_a_stuck_concept_restarts_it(svc, photo_of):
    _stuck(svc, photo_of, "mug", "caching")
    m = concepts.add_photos(svc, "alice", "mug", [photo_of(BLUE, 1)])  # the same photo again
    assert len(m.photos) == 1
    assert concepts.get_concept(svc, "alice", "mug").state == "ready"


def test_reuploading_to_a_concept_whose_work_is_in_hand_enqueues_nothing(svc, photo_of):
    _stuck(svc, photo_of, "mug", "caching", lapsed=False)
    concepts.add_photos(svc, "alice", "mug", [photo_of(BLUE, 1)])
    assert concepts.get_concept(svc, "alice", "mug").state == "caching"


def test_the_lease_keeper_renews_while_a_task_runs(svc, photo_of):
    _stuck(svc, photo_of, "mug", "mining", lapsed=False)
    svc.settings = svc.settings.model_copy(update={"celery": svc.settings.celery.model_copy(
        update={"lease_s": 0.6})})
    before = concepts.get_concept(svc, "alice", "mug").lease_until
    with reconciler.LeaseKeeper(svc, "alice", "mug"):
        time.sleep(1.0)  # two renewals at lease_s / 3
    after = concepts.get_concept(svc, "alice", "mug")
    # The 600 s lease is already further out than now + 0.6 s: renewal never moves it back.
    assert after.lease_until == before
    svc.store.write_manifest(after.model_copy(update={"lease_until": reconciler.utcnow()}))
    with reconciler.LeaseKeeper(svc, "alice", "mug"):
        time.sleep(1.0)
        assert not reconciler.lease_lapsed(concepts.get_concept(svc, "alice", "mug"))


def test_a_concept_without_photos_stays_queued(svc):
    concepts.create_concept(svc, "alice", "empty", "Bobo", "mug", "blue mug")
    empty = concepts.get_concept(svc, "alice", "empty")
    assert empty.state == "queued" and empty.lease_until is None
    assert not reconciler.lease_lapsed(empty)
    assert reconciler.reconcile(svc) == []  # nothing to enqueue: it waits for photos
    from personalkv.service_layer import pipeline

    pipeline.mine_concept(svc, "alice", "empty")  # a mining task that arrives anyway
    after = concepts.get_concept(svc, "alice", "empty")
    assert (after.state, after.chunks) == ("queued", [])


# -- a broker that lost its data (issue 20, item 4) ----------------------------------------
class _BrokerWithEpoch:
    """The in-process queue, answering ``intact_since`` as a broker restarted at ``since``
    would (the Celery adapter's answer on a real Redis: test_celery_app.py, test_recovery.py)."""

    def __init__(self, svc, since):
        from personalkv.service_layer.task_queue import InProcessTaskQueue

        class Queue(InProcessTaskQueue):
            enqueued: list = []

            def intact_since(self):
                if isinstance(since, Exception):
                    raise since
                return since

            def enqueue_mining(self, user_id, concept_id):
                Queue.enqueued.append(concept_id)

        self.queue = Queue(synchronous=True)
        svc.task_queue = self.queue


def _queued_at(svc, photo_of, concept: str, enqueued_s_ago: float):
    """A queued concept whose mining task was published `enqueued_s_ago` (its queued lease
    taken then), still well within that lease."""
    lease_s = svc.settings.celery.queued_lease_s
    assert enqueued_s_ago < lease_s / 2
    _stuck(svc, photo_of, concept, "queued", lapsed=False)
    m = concepts.get_concept(svc, "alice", concept)
    until = reconciler.utcnow() + timedelta(seconds=lease_s - enqueued_s_ago)
    svc.store.write_manifest(m.model_copy(update={"lease_until": until}))


def test_a_queued_task_published_before_the_broker_restarted_is_enqueued_again(svc, photo_of):
    restarted = reconciler.utcnow() - timedelta(seconds=60)
    broker = _BrokerWithEpoch(svc, restarted)
    _queued_at(svc, photo_of, "lost", enqueued_s_ago=120)  # before the restart: lost
    _queued_at(svc, photo_of, "kept", enqueued_s_ago=30)  # after it (+ clock skew): in the broker
    assert not reconciler.lease_lapsed(concepts.get_concept(svc, "alice", "lost"))
    assert reconciler.reconcile(svc) == [("alice", "lost", "mining")]
    assert broker.queue.enqueued == ["lost"]
    # Its new lease was taken after the restart: the next pass leaves it alone.
    assert reconciler.reconcile(svc) == []
    assert broker.queue.enqueued == ["lost"]


def test_resending_the_same_photos_after_a_broker_restart_enqueues_the_lost_task(svc, photo_of):
    broker = _BrokerWithEpoch(svc, reconciler.utcnow() - timedelta(seconds=60))
    _queued_at(svc, photo_of, "lost", enqueued_s_ago=120)
    _queued_at(svc, photo_of, "kept", enqueued_s_ago=30)
    concepts.add_photos(svc, "alice", "kept", [photo_of(BLUE, 1)])  # its task is still there
    assert broker.queue.enqueued == []
    concepts.add_photos(svc, "alice", "lost", [photo_of(BLUE, 1)])
    assert broker.queue.enqueued == ["lost"]
    concepts.add_photos(svc, "alice", "lost", [photo_of(BLUE, 1)])  # enqueued now: in hand
    assert broker.queue.enqueued == ["lost"]


def test_when_the_broker_cannot_tell_the_leases_decide(svc, photo_of):
    from personalkv.errors import Unavailable

    broker = _BrokerWithEpoch(svc, Unavailable("the task queue is not answering"))
    _queued_at(svc, photo_of, "waiting", enqueued_s_ago=120)
    assert reconciler.reconcile(svc) == []
    concepts.add_photos(svc, "alice", "waiting", [photo_of(BLUE, 1)])
    assert broker.queue.enqueued == []
    # The broker answers again, restarted just now: the queued task is re-sent; a worker's
    # mining lease is not a task waiting in the broker, so the epoch is no reason to re-send it.
    _stuck(svc, photo_of, "busy", "mining", lapsed=False)
    _BrokerWithEpoch(svc, reconciler.utcnow())
    assert reconciler.reconcile(svc) == [("alice", "waiting", "mining")]


class _CountingStore:
    """An object store that counts the calls that read (GET, LIST, HEAD), around the real one."""

    READS = ("get", "get_versioned", "list", "list_children", "exists")

    def __init__(self, inner):
        self.inner, self.reads = inner, 0

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if name in self.READS:
            def counted(*args, **kwargs):
                self.reads += 1
                result = attr(*args, **kwargs)
                return list(result) if name.startswith("list") else result
            return counted
        return attr


def test_a_pass_reads_what_is_in_flight_not_every_concept(service_settings, tiny):
    """10k ready concepts, 10 in flight (live leases): after the first pass over a store from
    before the ledger (a full scan that builds it), a pass costs 1 LIST + 1 GET per entry."""
    from personalkv.bootstrap import bootstrap
    from personalkv.manifest import ConceptManifest, ConceptProfile
    from personalkv.storage.memory import InMemoryObjectStore

    svc = bootstrap(service_settings, adapter=tiny("qwen2_vl"))
    counting = _CountingStore(InMemoryObjectStore())
    svc.store.objects = counting
    try:
        lease = reconciler.utcnow() + timedelta(seconds=600)
        for i in range(10_010):
            user, in_flight = f"u{i % 100}", i >= 10_000
            svc.store.write_manifest(ConceptManifest(
                user_id=user, concept_id=f"c{i}", profile=ConceptProfile(name=f"C{i}"),
                state="queued" if in_flight else "ready",
                lease_until=lease if in_flight else None), check_objects=False)
        # a store from before the ledger: its entries and completion mark are not there yet
        for key in list(counting.inner.list("work/")):
            counting.inner.delete(key)
        counting.reads = 0
        assert reconciler.reconcile(svc) == []  # live leases: nothing due
        assert counting.reads > 10_000  # the one full scan
        counting.reads = 0
        assert reconciler.reconcile(svc) == []
        assert counting.reads <= 10 + 10, counting.reads
        # a concept that finished leaves the ledger; one that starts joins it
        done = svc.store.read_manifest("u0", "c10000")
        svc.store.update_manifest("u0", "c10000", lambda m: m.model_copy(update={"state": "ready"}),
                                  check_objects=False)
        svc.store.update_manifest("u0", "c0", lambda m: m.model_copy(update={
            "state": "mining", "lease_until": reconciler.utcnow() - timedelta(seconds=1)}),
                                  check_objects=False)
        assert ("u0", "c10000") not in svc.store.work_in_flight() and done is not None
        counting.reads = 0
        assert reconciler.reconcile(svc) == [("u0", "c0", "mining")]  # lapsed: enqueued again
        assert counting.reads <= 10 + 10 + 2, counting.reads  # + the claim's read and CAS check
    finally:
        svc.close()


def test_a_stale_ledger_entry_is_removed_once_old(svc):
    from personalkv.manifest import ConceptManifest, ConceptProfile

    svc.store.write_manifest(ConceptManifest(user_id="alice", concept_id="mug",
                                             profile=ConceptProfile(name="Bobo"), state="ready"),
                             check_objects=False)
    svc.store.mark_ledger_complete()
    svc.store.add_work("alice", "mug")  # as a writer that crashed between manifest and ledger
    reconciler.reconcile(svc)
    assert ("alice", "mug") in svc.store.work_in_flight()  # young: may be entering flight
    svc.store.objects.put(svc.store.work_key("alice", "mug"), b"2020-01-01T00:00:00+00:00")
    reconciler.reconcile(svc)
    assert ("alice", "mug") not in svc.store.work_in_flight()
    svc.store.delete_user("alice")
    assert svc.store.work_in_flight() == []
