"""What every PersonalKV gRPC server shares: building, serving and stopping one.

Who calls what: ``build_server`` in ``services/ingestion/server.py`` and
``services/answering/server.py`` builds a ``GrpcServer`` around its servicer, and their ``run``
ends in ``serve()``; ``GrpcServer`` calls ``connection_options()`` and ``server_credentials()``
itself (they are public for the transport tests, ``tests/integration/api/test_tls.py``).

    server = GrpcServer("ingestion", register=lambda s: add_XServicer_to_server(..., s),
                        service_names=[...], port=0, settings=..., auth=...)
    server.start()        # binds, marks health SERVING, returns the bound port
    server.serve_forever()  # blocks; SIGTERM/SIGINT -> NOT_SERVING, stop(grace), return

Every server gets, in this order around the servicer: the metrics interceptor (latency by
method and status, unauthenticated calls included), the admission interceptor (at most
``rpc_slots(max_workers)`` RPCs but health at once; the rest of the pool is health's, so a hung
dependency never delays health), the auth interceptor (every RPC but health
and reflection needs a bearer token), the request decoding interceptor (bytes that do not parse
are INVALID_ARGUMENT, not INTERNAL; all three in ``personalkv.api.interceptors``), message size
limits from ServerSettings, the standard health service (one status per service name plus "";
probed by ``personalkv.api.health``) and server reflection.

Transport (ServerSettings): TLS when ``tls_cert_file`` / ``tls_key_file`` are set (the files
are re-read on the first handshake after they change, so a rotated cert-manager Secret needs no
restart), then a plaintext ``health_port`` serving grpc.health.v1 only may carry Kubernetes'
gRPC probes, which cannot speak TLS; ``max_connection_age_s`` sends GOAWAY to aged connections so
that clients re-resolve and spread over new replicas; keepalive pings free dead clients.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from personalkv.api.interceptors import (
    AdmissionInterceptor, AuthInterceptor, MetricsInterceptor, RequestDecodingInterceptor,
)
from personalkv.config import AuthSettings, ServerSettings
from personalkv.observability import start_metrics_server

log = logging.getLogger(__name__)

#: Threads of the pool that only health and reflection may use (see ``rpc_slots``).
HEALTH_THREADS = 2


#: seconds between two readiness checks of a started server (``GrpcServer(ready=...)``)
READY_POLL_S = 1.0


def rpc_slots(max_workers: int) -> int:
    """How many RPCs other than health and reflection a server runs at once: all threads but
    HEALTH_THREADS (at least one), so health answers at once whatever the others wait on."""
    return max(1, max_workers - HEALTH_THREADS)


class GrpcServer:
    def __init__(
        self, name: str, register: Callable[[grpc.Server], None], service_names: Sequence[str],
        *, port: int, settings: ServerSettings, auth: AuthSettings, metrics_port: int = 0,
        max_workers: int | None = None, ready: Callable[[], bool] | None = None,
        longest_call_s: float = 0.0,
    ) -> None:  # fmt: skip
        """``max_workers``: RPC threads (default ``settings.max_workers``). ``longest_call_s``:
        the longest an accepted RPC may run (the answering server's: its engine's longest wait);
        an aged connection's grace covers it, so connection ageing never cuts accepted work.
        ``ready``: polled every ``READY_POLL_S`` once started; health reports NOT_SERVING while
        it is false (or raises), so that a server whose engine cannot answer leaves the load
        balancer."""
        self.name = name
        self.ready = ready
        self.settings = settings
        self.port = port
        self.metrics_port = metrics_port
        self.service_names = list(service_names)
        limit = self.settings.max_message_bytes
        workers = max_workers or self.settings.max_workers
        self.server = grpc.server(
            futures.ThreadPoolExecutor(workers, thread_name_prefix=f"{name}-rpc"),
            interceptors=[MetricsInterceptor(name),
                          AdmissionInterceptor(rpc_slots(workers)),
                          AuthInterceptor(auth), RequestDecodingInterceptor()],
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),
                *connection_options(self.settings, longest_call_s),
            ],
        )  # fmt: skip
        register(self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        self.credentials = server_credentials(self.settings)
        self.health_server: grpc.Server | None = None
        self.health_port = 0
        self._metrics_http = None
        self._stopped = threading.Event()

    def start(self) -> int:
        """Bind, start and mark every service SERVING; returns the bound port."""
        address = f"{self.settings.host}:{self.port}"
        if self.credentials is None:
            bound = self.server.add_insecure_port(address)
        else:
            bound = self.server.add_secure_port(address, self.credentials)
        if not bound:
            raise RuntimeError(f"{self.name}: cannot bind {address}")
        self.port = bound
        if self.credentials is not None and self.settings.health_port:
            self._start_health_server()
        self.server.start()
        serving = self._is_ready()
        self._set_health(serving)
        if self.ready is not None:
            threading.Thread(target=self._watch_readiness, args=(serving,), name=f"{self.name}-readiness",
                             daemon=True).start()
        self._metrics_http = start_metrics_server(self.metrics_port, self.settings.host)
        log.info("grpc server started", extra={
            "server": self.name, "port": bound, "tls": self.credentials is not None,
            "health_port": self.health_port})
        return bound

    def _is_ready(self) -> bool:
        if self.ready is None:
            return True
        try:
            return bool(self.ready())
        except Exception:  # noqa: BLE001 - a readiness check that fails says "not ready"
            log.exception("readiness check failed", extra={"server": self.name})
            return False

    def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ["", *self.service_names]:
            self.health.set(service, status)

    def _watch_readiness(self, serving: bool) -> None:
        while not self._stopped.wait(READY_POLL_S):
            now = self._is_ready()
            if now != serving and not self._stopped.is_set():
                log.warning("health %s", "SERVING" if now else "NOT_SERVING", extra={"server": self.name})
                self._set_health(now)
                serving = now

    def _start_health_server(self) -> None:
        """Plaintext grpc.health.v1 (same statuses, nothing else) for probes that cannot TLS."""
        self.health_server = grpc.server(
            futures.ThreadPoolExecutor(2, thread_name_prefix=f"{self.name}-health"),
            options=[("grpc.so_reuseport", 0)],
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
        address = f"{self.settings.host}:{self.settings.health_port}"
        self.health_port = self.health_server.add_insecure_port(address)
        if not self.health_port:
            raise RuntimeError(f"{self.name}: cannot bind the health port {address}")
        self.health_server.start()

    def stop(self, grace: float | None = None) -> None:
        """Graceful: health NOT_SERVING at once, no new RPCs, in-flight ones get `grace` s."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.settings.grace_s if grace is None else grace
        log.info("grpc server stopping", extra={"server": self.name, "grace_s": grace})
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        if self.health_server is not None:
            self.health_server.stop(0).wait()
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


def connection_options(settings: ServerSettings, longest_call_s: float = 0.0) -> list[tuple[str, int]]:
    """gRPC core options for connection lifetime: max age (GOAWAY, then a grace for in-flight
    RPCs, at least ``longest_call_s``: an accepted call is never cut by ageing) and keepalive
    pings; clients may ping as often as the server does."""
    ms = lambda seconds: int(seconds * 1000)  # noqa: E731
    options = [
        ("grpc.keepalive_time_ms", ms(settings.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", ms(min(settings.keepalive_time_s, 30))),
    ]
    if settings.max_connection_age_s > 0:
        options += [
            ("grpc.max_connection_age_ms", ms(settings.max_connection_age_s)),
            ("grpc.max_connection_age_grace_ms", ms(max(settings.max_connection_age_grace_s, longest_call_s))),
        ]
    return options


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from the PEM files in ``settings`` (None: plaintext). gRPC asks the
    fetcher before each handshake; it returns a new configuration only when a file changed."""
    cert_file, key_file = settings.tls_cert_file, settings.tls_key_file
    if not cert_file and not key_file:
        return None
    if not (cert_file and key_file):
        raise ValueError("TLS needs both PERSONALKV_SERVER_TLS_CERT_FILE and _TLS_KEY_FILE")

    def load() -> tuple[tuple[float, float], grpc.ServerCertificateConfiguration]:
        stamp = (os.stat(cert_file).st_mtime, os.stat(key_file).st_mtime)
        with open(key_file, "rb") as key, open(cert_file, "rb") as cert:
            pair = (key.read(), cert.read())
        return stamp, grpc.ssl_server_certificate_configuration([pair])

    loaded, initial = load()  # fails at start-up, not at the first client, when unreadable
    state = {"stamp": loaded}

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        try:
            stamp = (os.stat(cert_file).st_mtime, os.stat(key_file).st_mtime)
            if stamp == state["stamp"]:
                return None
            state["stamp"], config = load()
            log.info("tls certificate reloaded", extra={"cert_file": cert_file})
            return config
        except (OSError, ValueError):  # mid-rotation: keep serving with the last good pair
            log.warning("tls certificate reload failed; keeping the previous one", exc_info=True)
            return None

    return grpc.dynamic_ssl_server_credentials(initial, fetch)


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
