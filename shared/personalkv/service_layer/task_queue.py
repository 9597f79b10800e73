"""The task queue port: how use cases hand work to the mining and caching workers.

``concepts.add_photos`` calls ``enqueue_mining``; ``pipeline.mine_concept`` calls
``enqueue_caching``. Two adapters, chosen in ``bootstrap``:

* ``InProcessTaskQueue`` (embedded mode, tests, the demo): runs the same pipeline functions in
  this process, on one background thread (``synchronous=True``: inline, in the caller's thread).
  ``wait_idle()`` blocks until everything enqueued so far (and what it enqueued) is done.
* ``CeleryTaskQueue`` (the stack): sends ``mining.mine_concept`` / ``caching.cache_concept`` to
  the ``mining`` / ``caching`` queues on Redis; ``personalkv worker --queue ...`` consumes them.

Tasks are idempotent by content, so enqueueing twice is harmless: callers enqueue whenever in
doubt rather than risk a concept stuck in ``queued``.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from personalkv.service_layer.errors import Unavailable

log = logging.getLogger(__name__)

TASK_MINE = "mining.mine_concept"
TASK_CACHE = "caching.cache_concept"
QUEUE_OF = {TASK_MINE: "mining", TASK_CACHE: "caching"}


class TaskQueue(ABC):
    @abstractmethod
    def enqueue_mining(self, user_id: str, concept_id: str) -> None: ...

    @abstractmethod
    def enqueue_caching(self, user_id: str, concept_id: str) -> None: ...

    # ``services`` below is bootstrap's ``Services``, left unannotated: bootstrap imports this
    # module, and a type-only import back would make the two a cycle.
    def bind(self, services) -> None:
        """Called once by ``bootstrap`` with the container the tasks run against."""

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Block until queued work is done (in-process only; True when idle)."""
        return True

    def close(self) -> None:
        pass


class InProcessTaskQueue(TaskQueue):
    def __init__(self, synchronous: bool = False):
        self.synchronous = synchronous
        self._services = None
        self._executor = None if synchronous else ThreadPoolExecutor(1, thread_name_prefix="pkv-task")
        self._pending = 0
        self._idle = threading.Condition()

    def bind(self, services) -> None:
        self._services = services

    def _submit(self, name: str, user_id: str, concept_id: str) -> None:
        from personalkv.service_layer import pipeline

        func = {TASK_MINE: pipeline.mine_concept, TASK_CACHE: pipeline.cache_concept}[name]

        def run() -> None:
            try:
                func(self._services, user_id, concept_id)
            except Exception:  # recorded on the manifest by the pipeline; keep the thread alive
                log.exception("task %s(%s, %s) failed", name, user_id, concept_id)
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

        with self._idle:
            self._pending += 1
        if self._executor is None:
            run()
        else:
            self._executor.submit(run)

    def enqueue_mining(self, user_id: str, concept_id: str) -> None:
        self._submit(TASK_MINE, user_id, concept_id)

    def enqueue_caching(self, user_id: str, concept_id: str) -> None:
        self._submit(TASK_CACHE, user_id, concept_id)

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout=timeout_s)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)


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

    def _send(self, name: str, user_id: str, concept_id: str) -> None:
        probing = self._suspect
        if probing and not self._probe.acquire(blocking=False):
            raise Unavailable("the task queue is unavailable; retry later")
        try:
            future = self._publisher.submit(self._publish, name, user_id, concept_id)
            try:
                future.result(timeout=self.publish_timeout_s)
            except FutureTimeout:
                future.cancel()
                self._suspect = True
                log.warning("publishing %s(%s, %s) took over %.1fs; the broker is not answering",
                            name, user_id, concept_id, self.publish_timeout_s)
                raise Unavailable("the task queue is not answering; retry later") from None
            except Exception as exc:  # kombu OperationalError, redis ConnectionError, ...
                self._suspect = True
                log.warning("publishing %s(%s, %s) failed: %s: %s", name, user_id, concept_id,
                            type(exc).__name__, exc)
                raise Unavailable("the task queue is unavailable; retry later") from exc
            self._suspect = False
        finally:
            if probing:
                self._probe.release()

    def enqueue_mining(self, user_id: str, concept_id: str) -> None:
        self._send(TASK_MINE, user_id, concept_id)

    def enqueue_caching(self, user_id: str, concept_id: str) -> None:
        self._send(TASK_CACHE, user_id, concept_id)

    def close(self) -> None:
        self._publisher.shutdown(wait=False, cancel_futures=True)
