"""A hung S3 (the real S3 server SIGSTOPped: connections open, nothing answers) never starves
health (issue 20: 10 GetConcepts held every thread and health took 19.7 s). The ingestion
server runs at its default ServerSettings over a real S3 server of this test's own; health
runs on threads no other RPC may take (``personalkv.api.server.rpc_slots``) and every read ends
UNAVAILABLE within the store's own bound (read timeout x attempts)."""

from __future__ import annotations

import os
import signal
import statistics
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

READS = 10
READ_TIMEOUT_S, RETRIES = 2.0, 1


@pytest.fixture
def own_s3():
    from personalkv.devstack.s3 import S3Server

    server = S3Server()
    endpoint = server.start()
    yield server, endpoint
    os.kill(server._proc.pid, signal.SIGCONT)
    server.stop()


def test_health_answers_fast_and_reads_end_unavailable_while_s3_hangs(own_s3):
    from personalkv.api.client import PersonalKVClient
    from personalkv.auth import mint_token
    from personalkv.bootstrap import bootstrap
    from personalkv.config import AuthSettings, IndexSettings, ServerSettings, Settings
    from services.ingestion.server import build_server

    server, endpoint = own_s3
    storage = endpoint.settings("hung").model_copy(update={
        "read_timeout_s": READ_TIMEOUT_S, "connect_timeout_s": 1.0, "retries": RETRIES})
    settings = Settings(storage=storage, index=IndexSettings(uri="memory://"))
    svc = bootstrap(settings.embedded().model_copy(update={"storage": storage}))
    auth = AuthSettings(secret="hung-storage-secret-" + "x" * 16)
    grpc_server = build_server(svc, port=0, settings=ServerSettings(), auth=auth)
    address = f"127.0.0.1:{grpc_server.start()}"
    # retry=False: each server answer is measured, not the client's retries of UNAVAILABLE
    client = PersonalKVClient(address, address, mint_token("alice", settings=auth), timeout_s=60,
                              retry=False)
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
    try:
        client.create_concept("mug", "Bobo", "mug", "blue mug")
        os.kill(server._proc.pid, signal.SIGSTOP)
        results: list[tuple[float, grpc.StatusCode, str]] = []

        def read() -> None:
            start = time.monotonic()
            try:
                client.get_concept("mug")
                results.append((time.monotonic() - start, grpc.StatusCode.OK, ""))
            except grpc.RpcError as err:
                results.append((time.monotonic() - start, err.code(), err.details()))

        reads = [threading.Thread(target=read) for _ in range(READS)]
        for t in reads:
            t.start()
        health_s = []
        while any(t.is_alive() for t in reads):
            start = time.monotonic()
            reply = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            health_s.append(time.monotonic() - start)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            time.sleep(0.05)
        for t in reads:
            t.join()
        p99 = statistics.quantiles(health_s, n=100)[98] if len(health_s) > 1 else health_s[0]
        print(f"\nS3 SIGSTOPped: {READS} GetConcepts -> "
              f"{sorted((round(d, 2), c.name) for d, c, _ in results)}; health p50 "
              f"{statistics.median(health_s) * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms, max "
              f"{max(health_s) * 1e3:.1f} ms over {len(health_s)} checks")
        # 100 ms is the target (measured above); asserted with room for a 3-4x slower machine
        assert max(health_s) < 1.0, health_s
        # the store's bound: (connect + read timeout) per attempt, 1 + RETRIES attempts;
        # asserted with a factor 2 of room for a loaded machine
        bound_s = (1.0 + READ_TIMEOUT_S) * (1 + RETRIES)
        for duration, code, details in results:
            assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
            assert "object store is unavailable" in details and "request id" in details, details
            assert duration < 2 * bound_s, (duration, bound_s)
        os.kill(server._proc.pid, signal.SIGCONT)
        assert client.get_concept("mug").concept_id == "mug"  # serving again
    finally:
        client.close()
        grpc_server.stop(grace=1.0)
        svc.close()
