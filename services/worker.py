"""The mining and caching workers' composition root: the home of their Celery app.

    personalkv worker --queue caching          # what deployments run (``services/cli.py``)
    celery -A services.worker worker -Q caching

Importing this module builds the settings once, makes the app from them
(``personalkv.celery_app.make_celery``), declares the two tasks
(``services/mining/tasks.py``, ``services/caching/tasks.py``) with the options every task has,
and starts the reconciler in each worker process. The tasks run against this process's
``Services``, wired by ``bootstrap`` on first use (the model loads in the process that runs
the tasks, not in the prefork parent).
"""

from __future__ import annotations

import os
import sys
import threading

from celery import signals

from personalkv.config import get_settings
from personalkv.celery_app import CeleryTaskQueue, make_celery, task_options
from services.caching import tasks as caching_tasks
from services.mining import tasks as mining_tasks

settings = get_settings()
app = make_celery(settings.celery)
#: Options every task is declared with (tests/support/hold_task.py declares one more).
TASK_OPTIONS = task_options(settings.celery)

_services = None
_services_lock = threading.Lock()
_reconciler = None


def worker_services():
    """This worker process's ``Services`` (configured store, index and Celery), built once."""
    global _services
    if _services is None:
        with _services_lock:
            if _services is None:
                from personalkv.bootstrap import bootstrap

                _services = bootstrap(settings, task_queue=CeleryTaskQueue(app))
    return _services


mine_concept = mining_tasks.declare(app, TASK_OPTIONS, worker_services)
cache_concept = caching_tasks.declare(app, TASK_OPTIONS, worker_services)


@signals.worker_process_init.connect(weak=False)
def _reconcile_in_pool_process(**_):
    """Prefork: the reconciler runs in the pool process (a thread in the forking parent would
    be copied, mid-whatever, into every child it forks)."""
    _start_reconciler()


@signals.worker_ready.connect(weak=False)
def _reconcile_in_worker(sender=None, **_):
    pool = getattr(sender, "pool", None)
    if pool is not None and type(pool).__module__.endswith("prefork"):
        return  # started in the pool processes instead
    _start_reconciler()


def _start_reconciler() -> None:
    global _reconciler
    if _reconciler is None:
        from personalkv.service_layer.reconciler import Reconciler

        _reconciler = Reconciler(worker_services()).start()


def run(args) -> int:
    """``personalkv worker``: a Celery worker of ``args.queue`` (comma-separated for both)."""
    from personalkv.observability import (
        instrument_celery, only_json_worker_output, setup_logging, start_metrics_server,
    )

    queues = [q.strip() for q in args.queue.split(",") if q.strip()]
    unknown = set(queues) - {"mining", "caching"}
    if unknown:
        print(f"unknown queue(s) {sorted(unknown)}; known: mining, caching", file=sys.stderr)
        return 2
    setup_logging(f"worker-{'+'.join(queues)}", settings.server, level=args.loglevel)
    # Readiness means ready: a model that cannot load stops the worker here, in one line,
    # before it takes a task (without reading weights: no CUDA in a prefork parent) ...
    from personalkv.models import ModelLoadError, check_model

    try:
        check_model(settings.model.name, settings=settings.model)
    except ModelLoadError as exc:
        print(f"personalkv worker: error: {exc}", file=sys.stderr)
        return 1
    options = only_json_worker_output() if settings.server.log_format == "json" else []
    instrument_celery(app)
    host = settings.server.host  # 0.0.0.0 in a pod: the kubelet probes it

    def ready_then_serve_metrics(**_) -> None:
        # ... and the process that runs the tasks loads it before its metrics endpoint (the
        # pod's readiness probe) answers: a pod whose model cannot load never turns Ready.
        try:
            worker_services().adapter  # noqa: B018
        except ModelLoadError as exc:
            print(f"personalkv worker: error: {exc}", file=sys.stderr, flush=True)
            os._exit(1)
        if args.metrics_port:
            start_metrics_server(args.metrics_port, host)

    if args.pool == "prefork":
        signals.worker_process_init.connect(ready_then_serve_metrics, weak=False)
    else:
        ready_then_serve_metrics()
    argv = [*options, "worker", "-Q", ",".join(queues), "-n", f"{'+'.join(queues)}@%h",
            "--pool", args.pool, "--loglevel", args.loglevel, "--without-gossip",
            "--without-mingle"]
    if args.concurrency:
        argv += ["--concurrency", str(args.concurrency)]
    app.worker_main(argv)
    return 0

