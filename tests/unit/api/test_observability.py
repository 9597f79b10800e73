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
