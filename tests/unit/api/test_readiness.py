"""gRPC health follows the server's readiness (``GrpcServer(ready=...)``): NOT_SERVING while the
check says not ready (or raises), SERVING again when it recovers; polled every READY_POLL_S.
The answering server passes its engine's ``healthy()`` (a scheduler loop that keeps dying)."""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from personalkv.api.server import READY_POLL_S, GrpcServer
from personalkv.config import AuthSettings, ServerSettings

SERVICE = "personalkv.v1.AnsweringService"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def _status(port: int, service: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status


def _becomes(port: int, want: int, timeout: float = 20 * READY_POLL_S) -> None:
    deadline = time.monotonic() + timeout  # 20 polls: room for a loaded machine
    while time.monotonic() < deadline:
        if all(_status(port, s) == want for s in ("", SERVICE)):
            return
        time.sleep(0.05)
    raise AssertionError(f"health did not become {want}: {_status(port, SERVICE)}")


def test_health_follows_readiness():
    state = {"ready": False}

    def ready():
        if state["ready"] is None:
            raise RuntimeError("the check itself fails")
        return state["ready"]

    server = GrpcServer("readiness", register=lambda s: None, service_names=[SERVICE], port=0,
                        settings=ServerSettings(host="127.0.0.1"),
                        auth=AuthSettings(secret="readiness-test-" + "x" * 24), ready=ready)
    port = server.start()
    try:
        assert _status(port, SERVICE) == NOT_SERVING  # not ready at start: never SERVING
        state["ready"] = True
        _becomes(port, SERVING)
        state["ready"] = None
        _becomes(port, NOT_SERVING)
        state["ready"] = True
        _becomes(port, SERVING)
    finally:
        server.stop(0)
