"""A task that holds its worker for a while, for the worker-shutdown tests.

Registered on the real PersonalKV Celery app (``services/worker.py``) with the same options as every pipeline task
(``TASK_OPTIONS``: acks_late, reject_on_worker_lost). Each run writes a marker file
``<marker_dir>/<event>-<worker tag>-<pid>-<time>`` when it starts and when it finishes, where the
worker tag is the ``PERSONALKV_TEST_WORKER_TAG`` the test gives each worker process.

Run a worker that has it with
``python -c "import tests.support.hold_task as t; t.worker_main()" --queue mining ...``:
the real ``personalkv worker`` command, plus this task module.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from services.worker import TASK_OPTIONS, app

TASK_HOLD = "test.hold"


def _mark(marker_dir: str, event: str) -> None:
    tag = os.environ.get("PERSONALKV_TEST_WORKER_TAG", "untagged")
    Path(marker_dir, f"{event}-{tag}-{os.getpid()}-{time.time():.3f}").touch()


@app.task(name=TASK_HOLD, **TASK_OPTIONS)
def hold(marker_dir: str, seconds: float) -> None:
    _mark(marker_dir, "start")
    time.sleep(seconds)
    _mark(marker_dir, "done")


def worker_main() -> None:
    from services.cli import main

    sys.exit(main(["worker", *sys.argv[1:]]))
