"""Prometheus metrics, the /metrics endpoint and structured (JSON) logging of every service.

Who calls what:
    gRPC servers     setup_logging(), start_metrics_server(port), MetricsInterceptor(service)
    Celery workers   setup_logging(), start_metrics_server(port), observe_task(name),
                     track_queue_depth(queue, probe) / set_queue_depth(queue, n)
    chunk cache      record_chunk_cache(hit=...), set_chunk_cache_bytes(n)

All metrics live in REGISTRY (the prometheus_client default registry), named ``personalkv_*``.
Label values are closed sets (method names, status code names, task names, queue names,
hit/miss), never user or concept ids, so cardinality stays bounded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

GRPC_LATENCY = Histogram(
    "personalkv_grpc_request_duration_seconds",
    "Server-side latency of gRPC requests, by service, method and status code.",
    ["service", "method", "code"], buckets=_LATENCY_BUCKETS,
)  # fmt: skip
TASKS = Counter(
    "personalkv_tasks_total", "Background tasks finished, by task name and outcome.",
    ["task", "outcome"],
)  # fmt: skip
TASK_DURATION = Histogram(
    "personalkv_task_duration_seconds", "Duration of background tasks, by task and outcome.",
    ["task", "outcome"], buckets=_LATENCY_BUCKETS + (300, 600),
)  # fmt: skip
QUEUE_DEPTH = Gauge("personalkv_queue_depth", "Messages waiting in a task queue.", ["queue"])
CHUNK_CACHE = Counter(
    "personalkv_chunk_cache_requests_total", "Hot-chunk LRU lookups, by result (hit/miss).",
    ["result"],
)  # fmt: skip
CHUNK_CACHE_BYTES = Gauge("personalkv_chunk_cache_bytes", "Bytes held by the hot-chunk LRU.")


# -- helpers for workers and the chunk cache ------------------------------------------------
@contextlib.contextmanager
def observe_task(task: str) -> Iterator[None]:
    """Count and time the enclosed task; outcome 'ok', or 'error' when it raises."""
    start, outcome = time.perf_counter(), "ok"
    try:
        yield
    except BaseException:
        outcome = "error"
        raise
    finally:
        TASKS.labels(task, outcome).inc()
        TASK_DURATION.labels(task, outcome).observe(time.perf_counter() - start)


def set_queue_depth(queue: str, depth: int) -> None:
    QUEUE_DEPTH.labels(queue).set(depth)


def track_queue_depth(queue: str, probe: Callable[[], float]) -> None:
    """Make the gauge call `probe()` at every scrape (e.g. Redis LLEN of the queue)."""
    QUEUE_DEPTH.labels(queue).set_function(probe)


def record_chunk_cache(hit: bool, count: int = 1) -> None:
    CHUNK_CACHE.labels("hit" if hit else "miss").inc(count)


def set_chunk_cache_bytes(nbytes: int) -> None:
    CHUNK_CACHE_BYTES.set(nbytes)


def start_metrics_server(port: int, host: str = "127.0.0.1"):
    """Serve REGISTRY at http://host:port/metrics from a daemon thread; None when port is 0.
    Returns the HTTP server (call .shutdown() to stop it)."""
    if not port:
        return None
    server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    logging.getLogger(__name__).info("metrics endpoint up", extra={"port": server.server_port})
    return server


# -- gRPC ----------------------------------------------------------------------------------
def metrics_interceptor(service: str):
    """A grpc.ServerInterceptor recording GRPC_LATENCY for every RPC (health included)."""
    import grpc

    from personalkv.api.handlers import wrap_handler

    @contextlib.contextmanager
    def timed(method: str, context) -> Iterator[None]:
        start = time.perf_counter()
        code = None
        try:
            yield
        except Exception:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        finally:
            code = code or context.code() or grpc.StatusCode.OK
            GRPC_LATENCY.labels(service, method, code.name).observe(time.perf_counter() - start)

    class MetricsInterceptor(grpc.ServerInterceptor):
        def intercept_service(self, continuation, handler_call_details):
            method = handler_call_details.method.rsplit("/", 1)[-1]
            return wrap_handler(continuation(handler_call_details),
                                lambda context: timed(method, context))

    return MetricsInterceptor()


# -- logging -------------------------------------------------------------------------------
_STANDARD_ATTRS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, service, plus any `extra=` fields."""

    def __init__(self, service: str = "") -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self.service:
            entry["service"] = self.service
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(service: str = "", level: str | None = None, fmt: str | None = None) -> None:
    """Configure the root logger once per process (level/format default to ServerSettings)."""
    from personalkv.config import get_settings

    settings = get_settings().server
    handler = logging.StreamHandler(sys.stderr)
    if (fmt or settings.log_format) == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel((level or settings.log_level).upper())
