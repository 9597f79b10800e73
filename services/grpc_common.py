"""What every PersonalKV gRPC server shares: building, serving and stopping one.

    server = GrpcServer("ingestion", register=lambda s: add_XServicer_to_server(..., s),
                        service_names=[...], port=0)
    server.start()        # binds, marks health SERVING, returns the bound port
    server.serve_forever()  # blocks; SIGTERM/SIGINT -> NOT_SERVING, stop(grace), return

Every server gets, in this order around the servicer: the metrics interceptor (latency by
method and status, unauthenticated calls included), the auth interceptor (every RPC but health
and reflection needs a bearer token), message size limits from ServerSettings, the standard
health service (one status per service name plus "") and server reflection.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from personalkv.auth import AuthInterceptor
from personalkv.config import AuthSettings, ServerSettings, get_settings
from personalkv.observability import metrics_interceptor, start_metrics_server

log = logging.getLogger(__name__)


class GrpcServer:
    def __init__(
        self, name: str, register: Callable[[grpc.Server], None], service_names: Sequence[str],
        *, port: int, metrics_port: int = 0, settings: ServerSettings | None = None,
        auth: AuthSettings | None = None,
    ) -> None:  # fmt: skip
        self.name = name
        self.settings = settings or get_settings().server
        self.port = port
        self.metrics_port = metrics_port
        self.service_names = list(service_names)
        limit = self.settings.max_message_bytes
        self.server = grpc.server(
            futures.ThreadPoolExecutor(self.settings.max_workers, thread_name_prefix=f"{name}-rpc"),
            interceptors=[metrics_interceptor(name), AuthInterceptor(auth)],
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),
            ],
        )  # fmt: skip
        register(self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        self._metrics_http = None
        self._stopped = threading.Event()

    def start(self) -> int:
        """Bind, start and mark every service SERVING; returns the bound port."""
        address = f"{self.settings.host}:{self.port}"
        bound = self.server.add_insecure_port(address)
        if not bound:
            raise RuntimeError(f"{self.name}: cannot bind {address}")
        self.port = bound
        self.server.start()
        for service in ["", *self.service_names]:
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._metrics_http = start_metrics_server(self.metrics_port, self.settings.host)
        log.info("grpc server started", extra={"server": self.name, "port": bound})
        return bound

    def stop(self, grace: float | None = None) -> None:
        """Graceful: health NOT_SERVING at once, no new RPCs, in-flight ones get `grace` s."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.settings.grace_s if grace is None else grace
        log.info("grpc server stopping", extra={"server": self.name, "grace_s": grace})
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        log.info("grpc server stopped", extra={"server": self.name})

    def serve_forever(self) -> None:
        """Block until SIGTERM/SIGINT (main thread) or stop(); then stop gracefully."""
        done = threading.Event()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: done.set())
        while not done.wait(0.5) and not self._stopped.is_set():
            pass
        self.stop()


def serve(name: str, server: GrpcServer, services, host: str) -> int:
    """Start ``server``, block until SIGTERM/SIGINT, then close the services: the tail of
    every gRPC entry point."""
    port = server.start()
    print(f"{name} listening on {host}:{port}", flush=True)
    try:
        server.serve_forever()
    finally:
        services.close()
    return 0


# -- translation helpers shared by the servicers --------------------------------------------
def caller(request_user_id: str = "") -> str:
    """The user an RPC acts for: the token's. A request may name a user explicitly; it must
    be a valid id (else INVALID_ARGUMENT) and the token's own (else PERMISSION_DENIED)."""
    from personalkv.auth import current_user_id
    from personalkv.ids import validate_user_id
    from personalkv.service.errors import PermissionDenied

    user_id = current_user_id()
    if request_user_id:
        validate_user_id(request_user_id)
        if request_user_id != user_id:
            raise PermissionDenied("the token may only act for its own user; user_id names another")
    return user_id


def deadline_passed(context: grpc.ServicerContext) -> bool:
    """Whether the client is gone (cancelled) or its deadline has passed."""
    remaining = context.time_remaining()
    return not context.is_active() or (remaining is not None and remaining <= 0)
