"""Metrics helpers and the JSON log format."""

from __future__ import annotations

import json
import logging
import urllib.request

import pytest
from prometheus_client import REGISTRY

from personalkv.observability import (
    JsonFormatter,
    observe_task,
    set_queue_depth,
    start_metrics_server,
    track_queue_depth,
    watch_chunk_cache,
)  # fmt: skip
from personalkv.service_layer.chunk_cache import ChunkCache


def _value(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_observe_task_counts_ok_and_error():
    ok, err = _value("personalkv_tasks_total", task="t.unit", outcome="ok"), _value(
        "personalkv_tasks_total", task="t.unit", outcome="error")
    with observe_task("t.unit"):
        pass
    with pytest.raises(ValueError), observe_task("t.unit"):
        raise ValueError("boom")
    assert _value("personalkv_tasks_total", task="t.unit", outcome="ok") == ok + 1
    assert _value("personalkv_tasks_total", task="t.unit", outcome="error") == err + 1
    assert _value("personalkv_task_duration_seconds_count", task="t.unit", outcome="ok") >= 1


def test_queue_depth_and_chunk_cache_are_exported():
    set_queue_depth("q.unit", 7)
    assert _value("personalkv_queue_depth", queue="q.unit") == 7
    track_queue_depth("q.probe", lambda: 3)
    assert _value("personalkv_queue_depth", queue="q.probe") == 3
    cache = ChunkCache(1 << 20)
    cache.get(("u", "c", "x"))
    watch_chunk_cache(cache)
    assert _value("personalkv_chunk_cache_requests_total", result="miss") == 1
    assert _value("personalkv_chunk_cache_budget_bytes") == 1 << 20


def test_metrics_endpoint_serves_the_registry():
    server = start_metrics_server(0)
    assert server is None  # port 0 means off
    from personalkv.devstack.s3 import free_port

    port = free_port()
    server = start_metrics_server(port)
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        body = opener.open(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "personalkv_grpc_request_duration_seconds" in body
    finally:
        server.shutdown()


def test_json_log_lines_carry_extras_and_exceptions():
    record = logging.makeLogRecord({"name": "x", "levelname": "INFO", "msg": "hello %s",
                                    "args": ("you",), "port": 5})
    entry = json.loads(JsonFormatter("ingestion").format(record))
    assert entry["msg"] == "hello you" and entry["port"] == 5 and entry["service"] == "ingestion"
    try:
        raise RuntimeError("bad")
    except RuntimeError:
        import sys

        record = logging.makeLogRecord({"msg": "failed", "exc_info": sys.exc_info()})
    assert "RuntimeError: bad" in json.loads(JsonFormatter().format(record))["exc"]


def test_with_json_logs_every_line_on_stderr_is_json(tmp_path):
    """A process that configures JSON logs, then warns and runs a tqdm progress bar (as model
    loading does): every line it writes is a JSON object, the warning among them."""
    import json
    import os
    import subprocess
    import sys

    script = (
        "import warnings\n"
        "from personalkv.config import ServerSettings\n"
        "from personalkv.observability import setup_logging\n"
        "setup_logging('test', ServerSettings(log_format='json'))\n"
        "warnings.warn('a library complains')\n"
        "from tqdm import tqdm\n"
        "for _ in tqdm(range(3)): pass\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE",
                                                              "HF_HUB_DISABLE_PROGRESS_BARS")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=120, check=True)
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # raises on any line that is not JSON
    assert any("a library complains" in r.get("msg", "") for r in records), records


@pytest.mark.slow
def test_with_json_logs_a_celery_worker_writes_only_json(tmp_path, redis_server):
    """`personalkv worker` (prefork, as deployed) with JSON logs, from start through a task to
    a SIGTERM shutdown: no Celery banner, no shutdown notice written past logging; every line
    on stdout and stderr is a JSON object."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import redis
    from personalkv.celery_app import CeleryTaskQueue, make_celery
    from personalkv.config import CelerySettings

    broker = redis_server.rsplit("/", 1)[0] + "/11"
    redis.Redis.from_url(broker).flushdb()
    env = {**os.environ,
           "PERSONALKV_SERVER_LOG_FORMAT": "json",
           "PERSONALKV_CELERY_BROKER_URL": broker,
           "PERSONALKV_CELERY_SOFT_SHUTDOWN_TIMEOUT_S": "0",
           "PERSONALKV_STORAGE_URL": f"file://{tmp_path / 'objects'}",
           "PERSONALKV_INDEX_URI": str(tmp_path / "milvus.db")}
    (tmp_path / "objects").mkdir()
    out_path = tmp_path / "worker.out"
    with open(out_path, "wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "worker", "--queue", "mining",
             "--concurrency", "1", "--loglevel", "INFO"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_for(text: str, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in out_path.read_text():
            assert worker.poll() is None and time.monotonic() < deadline, out_path.read_text()
            time.sleep(0.2)

    try:
        wait_for("ready.")
        # A task for a concept that does not exist: the task path's records, no model needed.
        queue = CeleryTaskQueue(make_celery(CelerySettings(broker_url=broker)))
        queue.enqueue_mining("alice", "nothing")
        queue.close()
        wait_for("succeeded")
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=10)
    lines = [line for line in out_path.read_text().splitlines() if line.strip()]
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not JSON: {line!r}\n" + "\n".join(lines))
    messages = [r.get("msg", "") for r in records]
    assert any(m.endswith("ready.") for m in messages), messages
    assert any("shutdown" in m.lower() for m in messages), messages  # the notice, as a record
