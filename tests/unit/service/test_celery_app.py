"""The Celery app and tasks follow the conventions: names, queues, acks_late, retries."""

from __future__ import annotations

from personalkv.service.errors import Unavailable


def test_tasks_are_registered_with_their_queue_and_delivery_guarantees():
    from personalkv.service.celery_app import app

    import services.caching.tasks
    import services.mining.tasks  # noqa: F401

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
    from personalkv.service.celery_app import make_celery
    from personalkv.service.task_queue import CeleryTaskQueue

    app = make_celery(CelerySettings(broker_url=f"redis://127.0.0.1:{free_port()}/0"))
    app.conf.broker_connection_timeout = 0.5
    with pytest.raises(Unavailable, match="task queue"):
        CeleryTaskQueue(app).enqueue_mining("alice", "mug")
