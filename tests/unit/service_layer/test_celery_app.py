"""The Celery app and tasks follow the conventions: names, queues, acks_late, retries."""

from __future__ import annotations

from personalkv.errors import Unavailable


def test_tasks_are_registered_with_their_queue_and_delivery_guarantees():
    from services.worker import app

    conf = app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_soft_time_limit < conf.task_time_limit
    assert conf.task_routes["mining.mine_concept"] == {"queue": "mining"}
    assert conf.task_routes["caching.cache_concept"] == {"queue": "caching"}
    for name in ("mining.mine_concept", "caching.cache_concept"):
        task = app.tasks[name]
        assert task.acks_late and task.reject_on_worker_lost
        assert task.autoretry_for == (Unavailable,) and task.retry_backoff and task.max_retries >= 1


def test_enqueue_with_the_broker_down_is_unavailable():
    import pytest
    from personalkv.config import CelerySettings
    from personalkv.devstack.s3 import free_port
    from personalkv.celery_app import make_celery
    from personalkv.celery_app import CeleryTaskQueue

    app = make_celery(CelerySettings(broker_url=f"redis://127.0.0.1:{free_port()}/0"))
    app.conf.broker_connection_timeout = 0.5
    with pytest.raises(Unavailable, match="task queue"):
        CeleryTaskQueue(app).enqueue_mining("alice", "mug")


def test_enqueue_to_a_broker_that_never_answers_fails_within_the_publish_deadline():
    """A listening socket that never replies (as a SIGSTOPped redis-server: the kernel accepts
    the connection, nobody reads): the publish gives up after publish_timeout_s, and while the
    broker is suspect, other callers fail at once instead of each waiting too."""
    import socket
    import threading
    import time

    import pytest
    from personalkv.config import CelerySettings
    from personalkv.celery_app import make_celery
    from personalkv.celery_app import CeleryTaskQueue

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    try:
        settings = CelerySettings(broker_url=f"redis://127.0.0.1:{silent.getsockname()[1]}/0",
                                  publish_timeout_s=1.0)
        queue = CeleryTaskQueue(make_celery(settings), publish_timeout_s=1.0)
        start = time.monotonic()
        with pytest.raises(Unavailable, match="not answering"):
            queue.enqueue_mining("alice", "mug")
        first = time.monotonic() - start
        assert 0.9 <= first < 3.0  # the deadline, with room for a busy machine
        # A probe is in flight in another thread: this caller does not wait for it.
        probe = threading.Thread(target=lambda: pytest.raises(Unavailable, queue.enqueue_mining,
                                                              "alice", "mug"))
        probe.start()
        time.sleep(0.2)
        start = time.monotonic()
        with pytest.raises(Unavailable):
            queue.enqueue_caching("alice", "mug")
        assert time.monotonic() - start < 0.5
        probe.join(10)
        queue.close()
    finally:
        silent.close()


def test_intact_since_is_kept_by_the_broker_and_moves_when_its_data_is_lost(redis_server):
    """The broker epoch marker on a real redis-server: stable while the data lives, later once
    the data is gone (FLUSHDB here; a restart without persistence in test_recovery.py);
    Unavailable when the broker is down."""
    from datetime import datetime, timedelta, timezone

    import pytest
    import redis
    from personalkv.celery_app import CeleryTaskQueue, make_celery
    from personalkv.config import CelerySettings
    from personalkv.devstack.s3 import free_port

    broker = redis_server.rsplit("/", 1)[0] + "/9"
    redis.Redis.from_url(broker).flushdb()
    queue = CeleryTaskQueue(make_celery(CelerySettings(broker_url=broker)))
    slack = timedelta(seconds=1)  # the marker is this host's clock, read as a float
    before = datetime.now(timezone.utc)
    first = queue.intact_since()
    assert before - slack <= first <= datetime.now(timezone.utc) + slack
    queue.enqueue_mining("alice", "mug")
    assert queue.intact_since() == first  # the data lives: same epoch
    redis.Redis.from_url(broker).flushdb()  # the queued message and the marker are gone
    assert queue.intact_since() > first
    queue.close()

    down = make_celery(CelerySettings(broker_url=f"redis://127.0.0.1:{free_port()}/0"))
    down.conf.broker_connection_timeout = 0.5
    with pytest.raises(Unavailable):
        CeleryTaskQueue(down).intact_since()
