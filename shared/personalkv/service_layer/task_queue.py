"""The task queue port: how use cases hand work to the mining and caching workers.

``concepts.add_photos`` calls ``enqueue_mining``; ``pipeline.mine_concept`` calls
``enqueue_caching``. The composition root (``personalkv.bootstrap``) picks the adapter from
``PERSONALKV_SERVICE_TASK_QUEUE``:

* ``InProcessTaskQueue`` (embedded mode, tests, the demo): runs the handlers the composition
  root gives it (``pipeline.mine_concept`` / ``pipeline.cache_concept`` bound to its
  ``Services``) in this process, on one background thread (``synchronous=True``: inline, in the
  caller's thread). ``wait_idle()`` blocks until everything enqueued so far (and what it
  enqueued) is done.
* ``CeleryTaskQueue`` (``personalkv.celery_app``; the stack): sends ``mining.mine_concept`` /
  ``caching.cache_concept`` to the ``mining`` / ``caching`` queues on Redis; ``personalkv worker
  --queue ...`` consumes them. ``wait_idle()`` blocks until both queues are empty and no
  task is running (`personalkv recache --stack`, the chart's recache hook Job).

Tasks are idempotent by content, so enqueueing twice is harmless: callers enqueue whenever in
doubt rather than risk a concept stuck in ``queued``.

``intact_since()`` tells the reconciler (and ``add_photos``) whether a message published earlier
can still be in the broker: the Celery adapter answers from a marker kept in the broker itself
(why a marker, and not the broker's uptime or a look into its queues: the reconciler's module
docstring).
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

log = logging.getLogger(__name__)

TASK_MINE = "mining.mine_concept"
TASK_CACHE = "caching.cache_concept"
QUEUE_OF = {TASK_MINE: "mining", TASK_CACHE: "caching"}

#: What runs a task in this process: ``handler(user_id, concept_id)``.
TaskHandler = Callable[[str, str], object]


class TaskQueue(ABC):
    @abstractmethod
    def enqueue_mining(self, user_id: str, concept_id: str) -> None: ...

    @abstractmethod
    def enqueue_caching(self, user_id: str, concept_id: str) -> None: ...

    def intact_since(self) -> datetime | None:
        """Since when the broker's messages are intact: a message published before this time is
        no longer in the broker (it restarted empty, was flushed, or another one took its place).
        None when the queue cannot tell; then leases alone decide. Raises Unavailable when the
        broker does not answer."""
        return None

    def bind(self, handlers: Mapping[str, TaskHandler]) -> None:
        """Called once by the composition root with the handler of each task name; a queue
        that runs tasks in this process keeps them, one that publishes ignores them."""

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Block until queued work is done (True), or ``timeout_s`` passed first (False)."""
        return True

    def close(self) -> None:
        pass


class InProcessTaskQueue(TaskQueue):
    def __init__(self, synchronous: bool = False):
        self.synchronous = synchronous
        self._handlers: dict[str, TaskHandler] = {}
        self._executor = None if synchronous else ThreadPoolExecutor(1, thread_name_prefix="pkv-task")
        self._pending = 0
        self._idle = threading.Condition()

    def bind(self, handlers: Mapping[str, TaskHandler]) -> None:
        self._handlers = dict(handlers)

    def _submit(self, name: str, user_id: str, concept_id: str) -> None:
        handler = self._handlers.get(name)
        if handler is None:
            raise RuntimeError(f"no handler bound for task {name!r} (bootstrap binds them)")

        def run() -> None:
            try:
                handler(user_id, concept_id)
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
