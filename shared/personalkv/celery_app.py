"""The Celery adapters: the app of the mining and caching workers (broker: Redis) and
``CeleryTaskQueue``, the service layer's ``TaskQueue`` port over it.

A factory with no import-time settings: ``make_celery(settings)`` builds the app and
``task_options(settings)`` the options of every task; the workers' composition root,
``services/worker.py``, builds the settings once, makes the app and declares the tasks on it.
``personalkv.bootstrap`` wires a ``CeleryTaskQueue`` when ``PERSONALKV_SERVICE_TASK_QUEUE`` is
``celery``. The service layer never imports this module (nor Celery).

Conventions (STYLE.md): one queue per worker kind (``mining``, ``caching``), task names
``"<service>.<verb>"``, tasks are one-line wrappers over ``personalkv.service_layer.pipeline``
(``services/mining/tasks.py``, ``services/caching/tasks.py``), ``acks_late`` with
``reject_on_worker_lost`` (a task whose worker dies - even by SIGKILL - is delivered again;
the pipeline is idempotent by content), soft and hard time limits, and retries with exponential
backoff and jitter on ``Unavailable`` (a dependency is down) only.

Redelivery after a whole worker (or node) dies does not wait for Redis' visibility timeout
(``PERSONALKV_CELERY_VISIBILITY_TIMEOUT_S``, keep it above the longest task, or a slow task is
delivered twice): a task renews its concept's lease while it runs, and the reconciler
(``personalkv.service_layer.reconciler``), started in every worker process by
``services/worker.py``,
enqueues a concept whose lease lapsed (``PERSONALKV_CELERY_LEASE_S``) again. A broker that lost
its data (restarted without persistence): ``CeleryTaskQueue.intact_since`` reads a marker key
(``BROKER_EPOCH_KEY``) that dies with the queues, and the reconciler re-sends a queued concept
published before it at once, not after its queued lease.

Run a worker with ``personalkv worker --queue caching`` (or ``celery -A services.worker worker
-Q caching``).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import datetime, timezone

from celery import Celery

from personalkv.config import CelerySettings
from personalkv.errors import Unavailable
from personalkv.service_layer.task_queue import QUEUE_OF, TASK_CACHE, TASK_MINE, TaskQueue

log = logging.getLogger(__name__)

#: The broker's epoch marker (``CeleryTaskQueue.intact_since``), beside Celery's own keys.
BROKER_EPOCH_KEY = "personalkv:broker-epoch"


def make_celery(settings: CelerySettings) -> Celery:
    """A Celery app configured from ``settings``; it declares no tasks (the worker's
    composition root, ``services/worker.py``, does; a publisher needs none)."""
    app = Celery("personalkv", broker=settings.broker_url, backend=settings.result_backend)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,  # a failure is recorded on the manifest
        worker_prefetch_multiplier=1,  # a model worker takes one task at a time
        worker_concurrency=settings.worker_concurrency,
        task_soft_time_limit=settings.task_soft_time_limit_s,
        task_time_limit=settings.task_time_limit_s,
        task_ignore_result=settings.result_backend is None,
        task_routes={name: {"queue": queue} for name, queue in QUEUE_OF.items()},
        task_default_queue="mining",
        # Socket timeouts: without them a publish to a hung Redis waits forever (issue 12).
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            "socket_timeout": settings.publish_timeout_s,
            "socket_connect_timeout": settings.publish_timeout_s,
        },
        broker_connection_timeout=settings.publish_timeout_s,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        task_serializer="json", accept_content=["json"],
    )
    # -- Worker shutdown (issue 13): SIGTERM (a rollout) hands the running task back. --------
    # `personalkv worker` maps SIGTERM to Celery's cold shutdown (REMAP_SIGTERM=SIGQUIT), which
    # first waits this soft-shutdown window for the task to finish, then cancels it; the Redis
    # transport puts every unacknowledged (acks_late) message back on its queue as the worker's
    # channel closes, so another worker starts it at once, not after the visibility timeout.
    # "On idle" too: a worker holding a retry's countdown (ETA) task hands that back as well.
    app.conf.update(
        worker_soft_shutdown_timeout=settings.soft_shutdown_timeout_s,
        worker_enable_soft_shutdown_on_idle=True,
    )
    return app


def task_options(settings: CelerySettings) -> dict:
    """Options every task is declared with (``services/worker.py`` declares them)."""
    return dict(
        acks_late=True,
        reject_on_worker_lost=True,
        autoretry_for=(Unavailable,),
        retry_backoff=True,
        retry_backoff_max=settings.retry_backoff_max_s,
        retry_jitter=True,
        max_retries=settings.max_retries,
    )


class CeleryTaskQueue(TaskQueue):
    """Publishes with a hard deadline (``celery.publish_timeout_s``): the broker's sockets time
    out after it (``make_celery``) and the publish itself runs on a small pool this thread waits
    on for at most that long, so a hung Redis (SIGSTOP, a half-open connection) costs an upload
    a bounded wait and an ``Unavailable``, never an RPC thread for minutes. A publish that
    timed out may still reach Redis later: tasks are idempotent, so that is harmless."""

    def __init__(self, app, publish_timeout_s: float | None = None):
        self.app = app
        # make_celery sets the broker's connection timeout to celery.publish_timeout_s
        self.publish_timeout_s = publish_timeout_s or app.conf.broker_connection_timeout
        self._publisher = ThreadPoolExecutor(4, thread_name_prefix="pkv-publish")
        # After a failed publish the broker is suspect: one caller at a time probes it (and
        # waits up to the deadline), the others fail at once instead of each waiting too.
        self._suspect = False
        self._probe = threading.Lock()

    def _publish(self, name: str, user_id: str, concept_id: str) -> None:
        self.app.send_task(
            name, args=(user_id, concept_id), queue=QUEUE_OF[name], retry=True,
            retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.1,
                          "interval_max": 0.1},
        )

    def _bounded(self, what: str, call, *args):
        """``call(*args)`` on the publisher pool, waited for at most the publish deadline;
        Unavailable when it fails or does not answer in time."""
        probing = self._suspect
        if probing and not self._probe.acquire(blocking=False):
            raise Unavailable("the task queue is unavailable; retry later")
        try:
            future = self._publisher.submit(call, *args)
            try:
                result = future.result(timeout=self.publish_timeout_s)
            except FutureTimeout:
                future.cancel()
                self._suspect = True
                log.warning("%s took over %.1fs; the broker is not answering", what,
                            self.publish_timeout_s)
                raise Unavailable("the task queue is not answering; retry later") from None
            except Exception as exc:  # kombu OperationalError, redis ConnectionError, ...
                self._suspect = True
                log.warning("%s failed: %s: %s", what, type(exc).__name__, exc)
                raise Unavailable("the task queue is unavailable; retry later") from exc
            self._suspect = False
            return result
        finally:
            if probing:
                self._probe.release()

    def _send(self, name: str, user_id: str, concept_id: str) -> None:
        self._bounded(f"publishing {name}({user_id}, {concept_id})", self._publish, name,
                      user_id, concept_id)

    def intact_since(self) -> datetime | None:
        """When the broker's current data set began, from a marker key in it
        (``BROKER_EPOCH_KEY``, the time of the first look after the data set began, set only
        if absent): it lives and dies with the queued messages (gone after a restart without
        persistence or a FLUSHALL, kept by AOF and by replication to a promoted replica), and
        plain SET / GET pass through any Redis proxy. None for a transport that is not Redis."""
        return self._bounded("reading the broker epoch", self._read_epoch)

    def _read_epoch(self) -> datetime | None:
        with self.app.pool.acquire(block=True) as conn:
            if conn.transport.driver_type != "redis":
                return None
            with conn.default_channel.conn_or_acquire() as client:
                pipe = client.pipeline(transaction=False)
                pipe.set(BROKER_EPOCH_KEY, repr(time.time()), nx=True)
                pipe.get(BROKER_EPOCH_KEY)
                _, value = pipe.execute()
        return datetime.fromtimestamp(float(value), timezone.utc)

    def enqueue_mining(self, user_id: str, concept_id: str) -> None:
        self._send(TASK_MINE, user_id, concept_id)

    def enqueue_caching(self, user_id: str, concept_id: str) -> None:
        self._send(TASK_CACHE, user_id, concept_id)

    def pending(self) -> int:
        """Tasks not done yet: waiting in the ``mining`` and ``caching`` queues, plus delivered
        and not acknowledged (running, or held by a worker for a retry's countdown: with
        ``acks_late`` a task is acknowledged only when it ends). The Redis transport keeps the
        unacknowledged messages of the broker's database in one hash (``unacked``), so the
        broker database must be PersonalKV's own (PERSONALKV_CELERY_BROKER_URL)."""
        with self.app.connection_for_read() as connection:
            channel = connection.default_channel
            waiting = sum(channel.queue_declare(queue=queue).message_count
                          for queue in sorted(set(QUEUE_OF.values())))
            return waiting + int(channel.client.hlen(channel.unacked_key))

    def wait_idle(self, timeout_s: float | None = None, poll_s: float = 0.5) -> bool:
        """Block until no task is pending (``pending() == 0``) on two polls in a row, ``poll_s``
        apart: a worker moves a message from its queue to ``unacked`` in two steps, and a task
        enqueues its successor (mining -> caching) before it is acknowledged, so one empty
        look could fall between. True when idle, False when ``timeout_s`` passed first. Waits
        for the workers' progress only: with no worker consuming, it waits until the timeout."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        idle_polls = 0
        while True:
            idle_polls = idle_polls + 1 if self.pending() == 0 else 0
            if idle_polls >= 2:
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic())))

    def close(self) -> None:
        self._publisher.shutdown(wait=False, cancel_futures=True)


__all__ = ["BROKER_EPOCH_KEY", "TASK_CACHE", "TASK_MINE", "CeleryTaskQueue", "make_celery",
           "task_options"]
