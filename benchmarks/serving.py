"""Serving benchmark: answers and tokens per second of one answering process under concurrent
Asks, thread-per-request against the batched scheduler, and what a full queue answers.

The real answering gRPC server (``python -m services.answering.server --embedded``, SmolLM2-135M
``smollm2``, real weights, offline) runs as a subprocess over a data dir where one user has 3
concepts (the text facts and drawn photos of ``benchmarks.conversation``), ingested first through
the use cases in a child process. A load generator of client threads (``PersonalKVClient``, one
channel each) asks in closed loop (each client asks again when answered) at 1, 4, 8 and 16
concurrent clients, ROUNDS Asks per client per level (so 16 x ROUNDS at 16 clients; p99 of so
few is close to the max), AskStream, 64 new tokens, greedy, top_k=3, the questions of
``benchmarks.conversation`` in turn. TTFT is measured at the client (call start to the first
text delta), end-to-end to the final message; tokens are the server's
``personalkv_answer_generated_tokens_total`` before and after the level (its /metrics), as an
answer may stop before 64 tokens. Two server processes, one after the other, with
``PERSONALKV_SERVICE_ANSWER_SCHEDULER=threads`` and ``=batched``; each is warmed up by 2 Asks.

Figures per mode and level: ``<mode>_c<N>_answers_per_s``, ``_tokens_per_s``,
``_ttft_p50_s`` / ``_p99_s``, ``_e2e_p50_s`` / ``_p99_s``, ``_queue_p50_s`` (the server's
``Timings.queue``), ``_itl_p50_s`` / ``_p99_s`` (inter-token latency: seconds between a
stream's consecutive text deltas); ``tokens_per_s_ratio_batched_over_threads_c8`` (target >= 3),
``ttft_p99_ratio_batched_over_threads_c8`` (target <= 1) and ``itl_p99_over_p50_batched_c8``
(target <= 2: running rows are not stalled by the prefills of those joining). Then, on the
batched server alone, one conversation of the 8 questions through AskStream
(``grpc_conversation_ttft_s`` at the client, ``grpc_conversation_place_ms`` from its Timings,
``grpc_followup_ttft_over_turn1_max``: target <= 1.5, a follow-up adding no evidence places
nothing). When an Ask fails, the servers' logs are kept in ``benchmarks/results/serving-logs/``.

Overload probe, on a third server (batched, queue and batch of OVERLOAD_QUEUE each): 4 x
OVERLOAD_QUEUE unary Asks at once (32 new tokens) while a client checks health every 100 ms:
``overload_refused`` (RESOURCE_EXHAUSTED) and their ``overload_refused_p99_s`` (target <= 0.1),
``overload_accepted_completed`` (every Ask not refused was answered), ``overload_other_errors``,
``overload_health_p99_s`` and ``overload_health_serving`` (all checks SERVING). The burst
probe, on a fourth server at the default limits (it admits 64 queued + 16 decoding = 80): 128
Asks at once (8 new tokens), the same figures under ``burst_`` (refusal p99 target <= 0.2 s).

PERSONALKV_BENCH_SERVING_ROUNDS (2). On 2 busy cores with both modes thread-per-request (before
the batched scheduler) ROUNDS=1 took 284 s, ROUNDS=2 takes ~8 min; ~5-6 min once batched
answers 3x the tokens per second.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass

import numpy as np

NAME = "serving"
USER = "bench"
LEVELS = (1, 4, 8, 16)
MODES = ("threads", "batched")
MAX_NEW_TOKENS = 64
OVERLOAD_QUEUE = 4
OVERLOAD_NEW_TOKENS = 32
BURST_ASKS, BURST_NEW_TOKENS = 128, 8
START_TIMEOUT_S = 600.0  # model, encoders and milvus-lite load before health turns SERVING
CALL_TIMEOUT_S = 900.0  # per Ask: 16 thread-per-request Asks on 2 cores take minutes
ROOT = pathlib.Path(__file__).resolve().parents[1]
GENERATED = "personalkv_answer_generated_tokens_total"


def _log(msg: str) -> None:
    print(f"[{NAME}] {msg}", flush=True)


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 4) if values else None


@dataclass
class _Server:
    """One answering server subprocess on free loopback ports."""

    proc: subprocess.Popen
    address: str
    metrics_port: int
    log: pathlib.Path

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def generated_tokens(self) -> float:
        """The server's generated-token counter, read from its /metrics."""
        from prometheus_client.parser import text_string_to_metric_families

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        body = opener.open(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=30).read()
        return sum(sample.value for family in text_string_to_metric_families(body.decode())
                   for sample in family.samples if sample.name == GENERATED)

    def stop(self) -> None:
        from personalkv.devstack.process import terminate

        terminate(self.proc, timeout_s=30)


def _child_env() -> dict[str, str]:
    """This environment for a child process that runs the code this process imported (a
    worktree's, not an installed copy)."""
    import personalkv

    library = pathlib.Path(personalkv.__file__).resolve().parents[1]
    path = os.pathsep.join([str(library), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def _start_server(work: str, label: str, secret: str, env_extra: dict[str, str]) -> _Server:
    from personalkv.devstack.s3 import free_port

    port, metrics_port = free_port(), free_port()
    env = {**_child_env(), "PERSONALKV_SERVICE_DATA_DIR": work, "PERSONALKV_MODEL_NAME": "smollm2",
           "PERSONALKV_AUTH_SECRET": secret, "PERSONALKV_SERVER_HOST": "127.0.0.1",
           # every client of the largest level, the health checks and a margin get a thread
           "PERSONALKV_SERVER_MAX_WORKERS": str(max(LEVELS[-1], 4 * OVERLOAD_QUEUE) + 4),
           "PERSONALKV_SERVER_LOG_LEVEL": "WARNING", **env_extra}
    log = pathlib.Path(work) / f"answering-{label}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.answering.server", "--embedded", "--port", str(port),
         "--metrics-port", str(metrics_port)],
        env=env, cwd=ROOT, stdout=open(log, "ab"), stderr=subprocess.STDOUT)  # fmt: skip
    server = _Server(proc, f"127.0.0.1:{port}", metrics_port, log)
    try:
        _wait_serving(server)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_serving(server: _Server) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + START_TIMEOUT_S
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                raise RuntimeError(f"answering server exited ({server.proc.returncode}):\n"
                                   f"{server.tail()}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise RuntimeError(f"answering server not SERVING after {START_TIMEOUT_S:.0f} s:\n{server.tail()}")


def _client(server: _Server, token: str):
    from personalkv.api.client import PersonalKVClient

    # Answering only: the ingestion address is never called here.
    return PersonalKVClient(server.address, server.address, token, timeout_s=CALL_TIMEOUT_S)


def _ask_stream(client, question: str) -> tuple[float, float, float, list[float]]:
    """(TTFT, end-to-end, server queue) seconds of one streamed Ask, and its inter-token
    latencies (seconds between consecutive text deltas)."""
    start = time.perf_counter()
    ttft = None
    queue_s = 0.0
    deltas: list[float] = []
    for event in client.ask_stream(question, max_new_tokens=MAX_NEW_TOKENS, temperature=0.0,
                                   top_k=3):
        kind = event.WhichOneof("event")
        if kind == "text_delta" and event.text_delta:
            deltas.append(time.perf_counter())
            if ttft is None:
                ttft = deltas[-1] - start
        elif kind == "final":
            queue_s = event.final.timings.queue_ms / 1000.0
    e2e = time.perf_counter() - start
    itl = [b - a for a, b in zip(deltas, deltas[1:])]
    return (e2e if ttft is None else ttft), e2e, queue_s, itl  # no text at all: first is last


def _conversation(server: _Server, token: str, questions: list[str]) -> dict:
    """One conversation of ``questions`` through AskStream, alone on the warm server: the
    client's TTFT per turn. Turn 1 places the evidence; a follow-up that adds none must not
    place again (target: every follow-up's TTFT <= 1.5x turn 1's)."""
    ttft, placed, cid = [], [], ""
    with _client(server, token) as client:
        for k, question in enumerate(questions):
            start, first = time.perf_counter(), None
            for event in client.ask_stream(question, max_new_tokens=MAX_NEW_TOKENS, temperature=0.0, top_k=3,
                                           start_conversation=(k == 0), conversation_id=cid):
                kind = event.WhichOneof("event")
                if kind == "text_delta" and event.text_delta and first is None:
                    first = time.perf_counter() - start
                elif kind == "final":
                    cid = cid or event.final.conversation_id
                    placed.append(event.final.timings.place_ms)
            ttft.append(round(first if first is not None else time.perf_counter() - start, 4))
    return {"grpc_conversation_ttft_s": ttft, "grpc_conversation_place_ms": [round(v, 1) for v in placed],
            "grpc_followup_ttft_over_turn1_max": round(max(ttft[1:]) / ttft[0], 3),
            "target_followup_ttft_over_turn1_max": 1.5}


def _level(server: _Server, token: str, questions: list[str], clients: int, asks: int) -> dict:
    """``clients`` threads in closed loop until ``asks`` Asks are answered."""
    taken = iter(range(asks))
    lock = threading.Lock()
    ttft, e2e, queue, itl, errors = [], [], [], [], []

    def worker() -> None:
        with _client(server, token) as client:
            while True:
                with lock:
                    k = next(taken, None)
                if k is None:
                    return
                try:
                    first, total, waited, gaps = _ask_stream(client, questions[k % len(questions)])
                except Exception as exc:  # noqa: BLE001  (counted and reported, not hidden)
                    with lock:
                        errors.append(repr(exc)[:300])
                    continue
                with lock:
                    ttft.append(first)
                    e2e.append(total)
                    queue.append(waited)
                    itl.extend(gaps)

    tokens_before = server.generated_tokens()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    tokens = server.generated_tokens() - tokens_before
    if errors:
        raise RuntimeError(f"{len(errors)} of {asks} Asks failed at {clients} clients: {errors[:3]}")
    return {"answers_per_s": round(asks / wall, 4), "tokens_per_s": round(tokens / wall, 3),
            "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99),
            "e2e_p50_s": _pct(e2e, 50), "e2e_p99_s": _pct(e2e, 99),
            "queue_p50_s": _pct(queue, 50), "itl_p50_s": _pct(itl, 50), "itl_p99_s": _pct(itl, 99),
            "asks": asks, "wall_s": round(wall, 2),
            "tokens": int(tokens)}


def _overload(server: _Server, token: str, question: str, *, n: int = 4 * OVERLOAD_QUEUE,
              new_tokens: int = OVERLOAD_NEW_TOKENS, name: str = "overload",
              admits: int = 2 * OVERLOAD_QUEUE, target_s: float = 0.1) -> dict:
    """``n`` unary Asks released at once, health checked every 100 ms meanwhile; the figures'
    keys start with ``name``."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    barrier = threading.Barrier(n)
    lock = threading.Lock()
    outcomes: list[tuple[str, float, str]] = []  # (status code name, seconds, details)

    def asker() -> None:
        with _client(server, token) as client:
            client.list_conversations()  # connect first: the refusal is timed, not the handshake
            barrier.wait()
            start = time.perf_counter()
            try:
                client.ask(question, max_new_tokens=new_tokens, temperature=0.0, top_k=3)
                code, details = "OK", ""
            except grpc.RpcError as exc:
                code, details = exc.code().name, exc.details() or ""
            with lock:
                outcomes.append((code, time.perf_counter() - start, details))

    done = threading.Event()
    health: list[tuple[bool, float]] = []

    def checker() -> None:
        with grpc.insecure_channel(server.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not done.is_set():
                start = time.perf_counter()
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
                    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
                except grpc.RpcError:
                    serving = False
                health.append((serving, time.perf_counter() - start))
                done.wait(0.1)

    askers = [threading.Thread(target=asker, daemon=True) for _ in range(n)]
    watch = threading.Thread(target=checker, daemon=True)
    watch.start()
    for t in askers:
        t.start()
    for t in askers:
        t.join()
    done.set()
    watch.join()
    # Refused: by the engine's queue (RESOURCE_EXHAUSTED) or, past the server's RPC slots, by
    # its admission interceptor (UNAVAILABLE "busy"); both at once, both say retry.
    def is_refusal(code: str, details: str) -> bool:
        return code == "RESOURCE_EXHAUSTED" or (code == "UNAVAILABLE" and "busy" in details)

    refused = [s for code, s, d in outcomes if is_refusal(code, d)]
    accepted = [code for code, _, d in outcomes if not is_refusal(code, d)]
    other = sorted({f"{code}: {d[:120]}" for code, _, d in outcomes
                    if code != "OK" and not is_refusal(code, d)})
    message = next((d for code, _, d in outcomes if code == "RESOURCE_EXHAUSTED"), "")
    figures = {
        "concurrent_asks": n, "admits": admits,
        "refused": len(refused), "refused_p99_s": _pct(refused, 99),
        "refused_message": message,
        "accepted": len(accepted),
        "accepted_completed": all(code == "OK" for code in accepted),
        "other_errors": other,
        "health_checks": len(health),
        "health_p99_s": _pct([s for _, s in health], 99),
        "health_serving": bool(health) and all(ok for ok, _ in health),
    }
    return {**{f"{name}_{key}": value for key, value in figures.items()},
            f"target_{name}_refused_p99_max_s": target_s}


def _ingest_in_child(work: str) -> None:
    """``_ingest`` in a child process: milvus-lite holds its data dir until the process that
    opened it exits (closing the client does not stop its server), and the answering server
    must open the same one next."""
    code = "import sys; from benchmarks.serving import _ingest; _ingest(sys.argv[1])"
    done = subprocess.run([sys.executable, "-c", code, work], env=_child_env(), cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"ingesting the 3 concepts failed (exit code {done.returncode})")


def _ingest(work: str) -> None:
    """The user's 3 concepts, through the use cases (embedded, inline tasks)."""
    from benchmarks.conversation import ingest_concepts
    from personalkv.bootstrap import bootstrap
    from personalkv.config import get_settings
    from personalkv.models import load_adapter

    settings = get_settings()
    settings = settings.model_copy(update={
        "service": settings.service.model_copy(update={"data_dir": work}),
        "model": settings.model.model_copy(update={"name": "smollm2"})})
    svc = bootstrap(settings.embedded(task_queue="inline"),
                    adapter=load_adapter("smollm2", settings=settings.model))
    try:
        ingest_concepts(svc, USER)
    finally:
        svc.close()


def run() -> dict:
    import shutil

    from benchmarks.conversation import QUESTIONS
    from personalkv.auth import mint_token
    from personalkv.config import AuthSettings, get_settings

    started = time.perf_counter()
    rounds = get_settings().bench.serving_rounds
    secret = "bench-serving-" + os.urandom(16).hex()
    token = mint_token(USER, settings=AuthSettings(secret=secret))
    work = tempfile.mkdtemp(prefix="pkv-bench-serving-")
    figures: dict = {"model": "smollm2", "concepts": 3, "max_new_tokens": MAX_NEW_TOKENS,
                     "levels": list(LEVELS), "asks_per_client": rounds}
    failed = False
    try:
        _ingest_in_child(work)
        _log(f"3 concepts ready ({time.perf_counter() - started:.0f} s)")
        for mode in MODES:
            server = _start_server(work, mode, secret, {"PERSONALKV_SERVICE_ANSWER_SCHEDULER": mode})
            try:
                with _client(server, token) as client:  # first forwards, encoders: untimed
                    for q in QUESTIONS[:2]:
                        _ask_stream(client, q)
                _log(f"{mode}: server up and warm ({time.perf_counter() - started:.0f} s)")
                for clients in LEVELS:
                    level = _level(server, token, QUESTIONS, clients, rounds * clients)
                    figures.update({f"{mode}_c{clients}_{k}": v for k, v in level.items()})
                    _log(f"{mode} c={clients}: {level['answers_per_s']:.2f} answers/s, "
                         f"{level['tokens_per_s']:.1f} tokens/s, ttft p50/p99 "
                         f"{level['ttft_p50_s']:.2f}/{level['ttft_p99_s']:.2f} s, e2e p50/p99 "
                         f"{level['e2e_p50_s']:.2f}/{level['e2e_p99_s']:.2f} s "
                         f"({level['asks']} Asks in {level['wall_s']:.0f} s)")
                if mode == "batched":
                    conversation = _conversation(server, token, QUESTIONS)
                    figures.update(conversation)
                    _log(f"conversation through gRPC: ttft per turn {conversation['grpc_conversation_ttft_s']} s, "
                         f"follow-ups at most {conversation['grpc_followup_ttft_over_turn1_max']}x turn 1")
            finally:
                server.stop()
        if 8 in LEVELS:
            figures["tokens_per_s_ratio_batched_over_threads_c8"] = round(
                figures["batched_c8_tokens_per_s"] / figures["threads_c8_tokens_per_s"], 3)
            figures["ttft_p99_ratio_batched_over_threads_c8"] = round(
                figures["batched_c8_ttft_p99_s"] / figures["threads_c8_ttft_p99_s"], 3)
            # running rows while others join: the p99 gap between tokens over its median
            figures["itl_p99_over_p50_batched_c8"] = round(
                figures["batched_c8_itl_p99_s"] / figures["batched_c8_itl_p50_s"], 3)
        figures.update({"target_tokens_per_s_ratio_c8_min": 3.0,
                        "target_ttft_p99_ratio_c8_max": 1.0, "target_itl_p99_over_p50_max": 2.0})

        small = {"PERSONALKV_SERVICE_ANSWER_SCHEDULER": "batched",
                 "PERSONALKV_SERVICE_ANSWER_QUEUE_SIZE": str(OVERLOAD_QUEUE),
                 "PERSONALKV_SERVICE_ANSWER_MAX_BATCH": str(OVERLOAD_QUEUE)}
        # The burst: BURST_ASKS at once against the default limits (queue 64 + batch 16 = 80).
        for name, env, kwargs in (
                ("overload", small, {}),
                ("burst", {"PERSONALKV_SERVICE_ANSWER_SCHEDULER": "batched"},
                 {"n": BURST_ASKS, "new_tokens": BURST_NEW_TOKENS, "admits": 80, "target_s": 0.2})):
            server = _start_server(work, name, secret, env)
            try:
                probe = _overload(server, token, QUESTIONS[0], name=name, **kwargs)
            finally:
                server.stop()
            figures.update(probe)
            _log(f"{name}: {probe[f'{name}_refused']} of {probe[f'{name}_concurrent_asks']} "
                 f"refused (p99 {probe[f'{name}_refused_p99_s']} s), accepted all completed: "
                 f"{probe[f'{name}_accepted_completed']}, health p99 "
                 f"{probe[f'{name}_health_p99_s']} s, always SERVING: {probe[f'{name}_health_serving']}")
            failed = failed or bool(probe[f"{name}_other_errors"]) or not probe[f"{name}_accepted_completed"]
        return figures
    except BaseException:
        failed = True
        raise
    finally:
        if failed:  # keep the servers' logs: they say why an accepted Ask failed
            kept = pathlib.Path(__file__).parent / "results" / "serving-logs"
            kept.mkdir(parents=True, exist_ok=True)
            for log in pathlib.Path(work).glob("*.log"):
                shutil.copy(log, kept / log.name)
            _log(f"an Ask failed: the servers' logs are kept in {kept}")
        shutil.rmtree(work, ignore_errors=True)
        _log(f"wall clock {time.perf_counter() - started:.0f} s")
