"""Prometheus metrics, the /metrics endpoint and the logs (JSON, or text with the same fields) of
every service.

Who calls what:
    gRPC servers     setup_logging(), start_metrics_server(port); GRPC_LATENCY and rpc_log
                     are written by personalkv.api.interceptors.MetricsInterceptor
    ingestion        track_celery_queues(broker_url, queues): queue depth = Redis LLEN per scrape
                     (no sample, and personalkv_queue_depth_up 0, while Redis is unreachable)
    answering        watch_chunk_cache(cache): hits/misses/bytes read from ChunkCache.stats();
                     SERVING (ServingMetrics): the answer scheduler reports queue, batches and
                     refusals, the servicer every answered Ask (TTFT, TPOT, stages, tokens)
    Celery workers   setup_logging(), instrument_celery(app) (task counts and durations from
                     Celery's signals), start_metrics_server(port) in the process running tasks;
                     or observe_task(name) around any unit of work

All metrics live in REGISTRY (the prometheus_client default registry), named ``personalkv_*``.
Label values are closed sets (method names, status code names, task names, queue names,
hit/miss), never user or concept ids, so cardinality stays bounded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import logging.handlers
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pythonjsonlogger.json import JsonFormatter as _LibJsonFormatter

from personalkv.config import ServerSettings

rpc_log = logging.getLogger("personalkv.rpc")
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


class _QueueDepthCollector:
    """``personalkv_queue_depth{queue}`` and ``personalkv_queue_depth_up{queue}``, read from each
    queue's probe at scrape time. A probe that raises (Redis unreachable) leaves that queue
    without a depth sample in the scrape and with up 0: never a sentinel number, which sum()
    and alert thresholds would take for a depth."""

    def __init__(self) -> None:
        self.probes: dict[str, Callable[[], float]] = {}
        self._down: set[str] = set()

    def _families(self):
        return (GaugeMetricFamily("personalkv_queue_depth", "Messages waiting in a task queue "
                                  "(no sample while it cannot be read: see _up).", labels=["queue"]),
                GaugeMetricFamily("personalkv_queue_depth_up", "1 when this scrape read the "
                                  "queue's depth, 0 when it could not (broker unreachable).",
                                  labels=["queue"]))

    def describe(self):
        return list(self._families())  # names only: registering must not call the probes

    def collect(self):
        depth, up = self._families()
        for queue, probe in sorted(self.probes.items()):
            try:
                value = float(probe())
            except Exception as exc:  # whatever the probe hits, this scrape must still answer
                if queue not in self._down:  # logged once per outage, not once per scrape
                    logging.getLogger(__name__).warning(
                        "queue depth unreadable", extra={"queue": queue, "error": repr(exc)})
                self._down.add(queue)
                up.add_metric([queue], 0)
                continue
            self._down.discard(queue)
            depth.add_metric([queue], value)
            up.add_metric([queue], 1)
        yield depth
        yield up


QUEUE_DEPTH = _QueueDepthCollector()
REGISTRY.register(QUEUE_DEPTH)


def set_queue_depth(queue: str, depth: int) -> None:
    QUEUE_DEPTH.probes[queue] = lambda: depth


def track_queue_depth(queue: str, probe: Callable[[], float]) -> None:
    """Read `probe()` at every scrape (e.g. Redis LLEN of the queue); a probe that raises means
    "unknown" for that scrape (no depth sample, personalkv_queue_depth_up 0)."""
    QUEUE_DEPTH.probes[queue] = probe


def track_celery_queues(broker_url: str, queues: Sequence[str]) -> None:
    """Queue depth of Celery's Redis queues (a Redis list per queue), read at every scrape;
    while Redis cannot be reached the depth is absent and personalkv_queue_depth_up is 0."""
    import redis

    client = redis.Redis.from_url(broker_url, socket_timeout=1, socket_connect_timeout=1)
    for queue in queues:
        track_queue_depth(queue, lambda queue=queue: float(client.llen(queue)))


class _ChunkCacheCollector:
    """Exports a ChunkCache's own counters at scrape time (the cache needs no metrics code)."""

    def __init__(self, cache) -> None:
        self.cache = cache

    def collect(self):
        stats = self.cache.stats()
        requests = CounterMetricFamily("personalkv_chunk_cache_requests",
                                       "Hot-chunk LRU lookups, by result.", labels=["result"])
        requests.add_metric(["hit"], stats.hits)
        requests.add_metric(["miss"], stats.misses)
        yield requests
        yield CounterMetricFamily("personalkv_chunk_cache_evictions",
                                  "Chunks evicted from the hot-chunk LRU.", value=stats.evictions)
        yield GaugeMetricFamily("personalkv_chunk_cache_bytes",
                                "Bytes held by the hot-chunk LRU.", value=stats.bytes)
        yield GaugeMetricFamily("personalkv_chunk_cache_budget_bytes",
                                "Byte budget of the hot-chunk LRU.", value=stats.budget_bytes)
        yield GaugeMetricFamily("personalkv_chunk_cache_entries",
                                "Chunks held by the hot-chunk LRU.", value=stats.entries)


_watched_cache: _ChunkCacheCollector | None = None


def watch_chunk_cache(cache) -> None:
    """Export `cache` (personalkv.service_layer.chunk_cache.ChunkCache) from this process; a second
    call replaces the first cache."""
    global _watched_cache
    if _watched_cache is not None:
        REGISTRY.unregister(_watched_cache)
    _watched_cache = _ChunkCacheCollector(cache)
    REGISTRY.register(_watched_cache)


def instrument_celery(app) -> None:
    """Count and time every task of `app` from Celery's signals (TASKS, TASK_DURATION)."""
    from celery import signals

    started: dict[str, float] = {}

    @signals.task_prerun.connect(weak=False)
    def _prerun(task_id=None, **_):
        started[task_id] = time.perf_counter()

    @signals.task_postrun.connect(weak=False)
    def _postrun(task_id=None, task=None, state=None, **_):
        start = started.pop(task_id, None)
        outcome = {"SUCCESS": "ok", "RETRY": "retry"}.get(state or "", "error")
        name = getattr(task, "name", "unknown")
        TASKS.labels(name, outcome).inc()
        if start is not None:
            TASK_DURATION.labels(name, outcome).observe(time.perf_counter() - start)


def start_metrics_server(port: int, host: str = "127.0.0.1"):
    """Serve REGISTRY at http://host:port/metrics from a daemon thread; None when port is 0.
    Returns the HTTP server (call .shutdown() to stop it)."""
    if not port:
        return None
    server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    logging.getLogger(__name__).info("metrics endpoint up", extra={"port": server.server_port})
    return server


# -- serving metrics of the answering process (issue 19) -------------------------------------
_TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_REJECT_REASONS = ("queue_full", "deadline")

ANSWER_TTFT = Histogram(
    "personalkv_answer_time_to_first_token_seconds",
    "Server-side time to the first answer token of an Ask: queue + retrieve + load + place + "
    "recompute + prefill + rebuild.", buckets=_TTFT_BUCKETS,
)  # fmt: skip
ANSWER_TPOT = Histogram(
    "personalkv_answer_time_per_output_token_seconds",
    "Decode seconds per generated token after the first, per answered Ask.", buckets=_TPOT_BUCKETS,
)  # fmt: skip
ANSWER_QUEUE_WAIT = Histogram(
    "personalkv_answer_queue_wait_seconds",
    "Time an Ask waited in the answering queue before the model took it up.",
    buckets=_WAIT_BUCKETS,
)  # fmt: skip
ANSWER_STAGE = Histogram(
    "personalkv_answer_stage_seconds", "Seconds per stage of an answered Ask (the fields of "
    "service_layer.answering.Timings).", ["stage"], buckets=_LATENCY_BUCKETS,
)  # fmt: skip
ANSWER_BATCH = Histogram(
    "personalkv_answer_batch_size", "Requests per batched forward of the answer scheduler.",
    buckets=_BATCH_BUCKETS,
)  # fmt: skip
ANSWER_IN_FLIGHT = Gauge("personalkv_answer_requests_in_flight",
                         "Asks being answered now (prefilling or decoding).")
ANSWER_QUEUED = Gauge("personalkv_answer_requests_queued", "Asks waiting for the model.")
ANSWER_TOKENS = Counter("personalkv_answer_generated_tokens",
                        "Answer tokens generated by answered Asks.")
ANSWER_REUSED = Counter("personalkv_answer_prompt_tokens_reused", "Prompt tokens whose KV an "
                        "answered Ask took from stored chunks or a kept conversation.")
ANSWER_REJECTED = Counter("personalkv_answer_rejected", "Asks refused before the model ran, "
                          "by reason (queue_full, deadline).", ["reason"])
for _reason in _REJECT_REASONS:  # exported as 0 from the start, so rate() has a series
    ANSWER_REJECTED.labels(_reason)


class ServingMetrics:
    """What the answer scheduler and the answering servicer report. The scheduler calls
    ``queue_depth``, ``running``, ``batch``, ``rejected`` and ``queue_wait`` as things happen;
    the servicer calls ``answered`` once per answered Ask (unary, or a stream's final result),
    whichever scheduler ran it. ``queue_wait`` counts every Ask that left the queue (cancelled
    ones too); the ``queue`` stage of ``answered`` only answered ones."""

    def queue_depth(self, n: int) -> None:
        ANSWER_QUEUED.set(n)

    def running(self, n: int) -> None:
        """Requests in flight (prefilling or decoding)."""
        ANSWER_IN_FLIGHT.set(n)

    def batch(self, size: int) -> None:
        """One batched forward of ``size`` requests."""
        ANSWER_BATCH.observe(size)

    def rejected(self, reason: str) -> None:
        if reason not in _REJECT_REASONS:  # label values stay a closed set
            raise ValueError(f"rejection reason {reason!r} is not one of {_REJECT_REASONS}")
        ANSWER_REJECTED.labels(reason).inc()

    def queue_wait(self, seconds: float) -> None:
        ANSWER_QUEUE_WAIT.observe(seconds)

    def answered(self, result) -> None:
        """An AskResult (service_layer.answering; duck-typed, as the service layer imports this
        module): TTFT, TPOT (decode / (tokens - 1); none for a one-token answer), the stage
        histograms and the token counters."""
        t = result.timings
        ANSWER_TTFT.observe(t.queue + t.retrieve + t.load + t.place + t.recompute + t.prefill
                            + t.rebuild)
        generated = len(result.token_ids)
        if generated > 1:  # the first token comes out of the prefill
            ANSWER_TPOT.observe(t.decode / (generated - 1))
        for stage in dataclasses.fields(t):
            ANSWER_STAGE.labels(stage.name).observe(getattr(t, stage.name))
        ANSWER_TOKENS.inc(generated)
        ANSWER_REUSED.inc(result.reused_tokens)


SERVING = ServingMetrics()


# -- logging -------------------------------------------------------------------------------
_STANDARD_ATTRS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(_LibJsonFormatter):
    """One JSON object per line: ts, level, logger, msg, service, plus any `extra=` fields and
    exc (the formatted traceback), by python-json-logger. Extras that JSON cannot encode are
    written as str()."""

    converter = time.gmtime  # ts: UTC, milliseconds, e.g. 2024-05-01T12:00:00.123Z
    default_time_format = "%Y-%m-%dT%H:%M:%S"
    default_msec_format = "%s.%03dZ"

    def __init__(self, service: str = "") -> None:
        super().__init__(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "ts", "levelname": "level", "name": "logger",
                           "message": "msg", "exc_info": "exc"},
            static_fields={"service": service} if service else None,
            reserved_attrs=sorted(_STANDARD_ATTRS),  # every other record attribute is an extra
            json_default=str,
        )


class TextFormatter(logging.Formatter):
    """Human-readable lines, ``ts LEVEL service logger: message key=value ...``: the `extra=`
    fields the JSON format carries are appended in the order given (a value with spaces,
    quotes or '=' JSON-quoted, logfmt style), so a text log keeps an RPC's method, code,
    duration and request id; a traceback follows on the next lines."""

    def __init__(self, service: str = "") -> None:
        service = f" {service}" if service else ""
        super().__init__(f"%(asctime)s %(levelname)s{service} %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        fields = [f"{key}={_logfmt_value(value)}" for key, value in vars(record).items()
                  if key not in _STANDARD_ATTRS]
        return " ".join([super().formatMessage(record), *fields])


def _logfmt_value(value) -> str:
    text = str(value)
    if not text or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text)
    return text


def setup_logging(service: str, settings: ServerSettings, level: str | None = None,
                  fmt: str | None = None) -> None:
    """Configure the root logger once per process (level/format default to ``settings``, the
    process's ServerSettings, which its entry point passes)."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if settings.log_file:  # the dev stack's processes: history kept, bounded (size rotation)
        handlers.append(logging.handlers.RotatingFileHandler(
            settings.log_file, maxBytes=settings.log_file_max_bytes,
            backupCount=settings.log_file_backups, encoding="utf-8"))
    formatter = JsonFormatter(service) if (fmt or settings.log_format) == "json" else TextFormatter(service)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel((level or settings.log_level).upper())
    if (fmt or settings.log_format) == "json":
        only_json_output()


# --- JSON-only output (issue 20) ------------------------------------------------------------


def only_json_output() -> None:
    """With JSON logs, nothing else may reach stdout/stderr: Python warnings go through logging
    (as JSON lines), and the progress bars of tqdm, huggingface_hub and transformers are off
    (the environment variables they read when first imported, set before that; transformers'
    own switch as well in case it is already loaded)."""
    logging.captureWarnings(True)
    for variable in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS"):
        os.environ.setdefault(variable, "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def only_json_worker_output() -> list[str]:
    """With JSON logs, a Celery worker's own terminal output goes through logging too: its
    shutdown notices (``celery.apps.worker.safe_say`` writes them straight to the file
    descriptor, past any handler) become log records, and its start-up banner is off (the
    returned global options, placed before ``worker``; what the banner said, the worker's
    name, queues and transport, its "Connected to" and "ready" records say). Everything else
    it prints after start-up, Celery already redirects into logging (worker_redirect_stdouts)."""
    from celery.apps import worker as celery_worker

    notices = logging.getLogger("celery.apps.worker")

    def say(msg, f=None):  # called from signal handlers, as the original is
        notices.warning("%s", str(msg).strip())

    celery_worker.safe_say = say
    return ["--quiet"]
