"""Metrics helpers and the JSON log format."""

from __future__ import annotations

import json
import logging
import re
import urllib.request

import pytest
from prometheus_client import REGISTRY, generate_latest

from personalkv.observability import (
    JsonFormatter,
    TextFormatter,
    observe_task,
    set_queue_depth,
    start_metrics_server,
    track_celery_queues,
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


def test_an_unreadable_queue_has_no_depth_sample_and_up_0_never_a_sentinel():
    def broker_down():
        raise ConnectionError("redis unreachable")

    track_queue_depth("q.down", broker_down)
    assert REGISTRY.get_sample_value("personalkv_queue_depth", {"queue": "q.down"}) is None
    assert _value("personalkv_queue_depth_up", queue="q.down") == 0
    # every value the gauge does export is a real depth (sum() over queues stays meaningful)
    track_queue_depth("q.down", lambda: 4)
    assert _value("personalkv_queue_depth", queue="q.down") == 4
    assert _value("personalkv_queue_depth_up", queue="q.down") == 1


def test_celery_queue_depth_follows_a_real_redis_through_an_outage(tmp_path):
    import shutil

    import redis

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install -y redis-server)")
    from personalkv.devstack.redis import RedisServer

    server = RedisServer(tmp_path).start()
    try:
        redis.Redis.from_url(server.url).rpush("q.celery", b"a", b"b", b"c")
        track_celery_queues(server.url, ["q.celery", "q.empty"])
        assert _value("personalkv_queue_depth", queue="q.celery") == 3
        assert _value("personalkv_queue_depth", queue="q.empty") == 0
        assert _value("personalkv_queue_depth_up", queue="q.celery") == 1
    finally:
        server.stop()
    for queue in ("q.celery", "q.empty"):  # Redis gone: unknown, not -1 and not a stale 3
        assert REGISTRY.get_sample_value("personalkv_queue_depth", {"queue": queue}) is None
        assert _value("personalkv_queue_depth_up", queue=queue) == 0
    body = generate_latest(REGISTRY).decode()
    assert not re.search(r"^personalkv_queue_depth\{.*\} -", body, re.M)  # no negative sample


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


def test_text_log_lines_keep_the_extra_fields_before_the_traceback():
    record = logging.makeLogRecord({
        "name": "personalkv.rpc", "levelname": "INFO", "msg": "rpc", "grpc_service": "answering",
        "method": "Ask", "code": "DEADLINE_EXCEEDED", "duration_ms": 12.5,
        "request_id": "r-1", "reason": 'said "no" = refused', "empty": ""})
    line = TextFormatter("answering").format(record)
    assert line.endswith(" INFO answering personalkv.rpc: rpc grpc_service=answering method=Ask "
                         'code=DEADLINE_EXCEEDED duration_ms=12.5 request_id=r-1 '
                         'reason="said \\"no\\" = refused" empty=""'), line
    try:
        raise RuntimeError("bad")
    except RuntimeError:
        import sys

        record = logging.makeLogRecord({"msg": "failed", "exc_info": sys.exc_info(), "port": 5})
    first, *rest = TextFormatter().format(record).splitlines()
    assert first.endswith("failed port=5") and rest[-1] == "RuntimeError: bad"


def test_text_logs_of_a_process_carry_the_rpc_fields():
    """A process configured for text logs (PERSONALKV_SERVER_LOG_FORMAT=text) writes the RPC
    log line with its fields, as the server's interceptor logs it."""
    import os
    import subprocess
    import sys

    script = (
        "from personalkv.config import ServerSettings\n"
        "from personalkv.observability import rpc_log, setup_logging\n"
        "setup_logging('ingestion', ServerSettings())\n"
        "rpc_log.info('rpc', extra={'grpc_service': 'ingestion', 'method': 'AddPhotos',\n"
        "                           'code': 'OK', 'duration_ms': 3.25})\n"
    )
    env = {**os.environ, "PERSONALKV_SERVER_LOG_FORMAT": "text"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=120, check=True)
    (line,) = [ln for ln in out.stderr.splitlines() if "personalkv.rpc" in ln]
    assert line.endswith("INFO ingestion personalkv.rpc: rpc grpc_service=ingestion "
                         "method=AddPhotos code=OK duration_ms=3.25"), line


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


def test_a_log_file_is_rotated_by_size_keeping_the_configured_backups(tmp_path):
    """Issue 30: the log keeps history (several files), bounded by size."""
    import json
    import subprocess
    import sys

    path = tmp_path / "answering.log"
    script = (
        "import logging\n"
        "from personalkv.config import ServerSettings\n"
        "from personalkv.observability import setup_logging\n"
        f"setup_logging('answering', ServerSettings(log_file={str(path)!r}, log_file_max_bytes=2048,"
        " log_file_backups=3))\n"
        "for i in range(200): logging.getLogger('personalkv.test').warning('line %d %s', i, 'x' * 40)\n"
    )
    subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120, check=True)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["answering.log", "answering.log.1", "answering.log.2", "answering.log.3"], files
    for p in tmp_path.iterdir():
        assert p.stat().st_size <= 2048 + 400  # one record past the limit at most
    newest = [json.loads(line) for line in path.read_text().splitlines()]
    assert newest[-1]["msg"].startswith("line 199 ")  # the newest lines are in log_file
