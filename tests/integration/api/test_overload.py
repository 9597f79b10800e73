"""Overload through gRPC: an answering server whose scheduler holds 2 Asks beside a batch of 2
gets 16 at once. Every refused call is RESOURCE_EXHAUSTED with a message that says to retry,
every accepted one is answered (nothing accepted is dropped), and health answers SERVING
meanwhile."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from personalkv.api.client import PersonalKVClient
from personalkv.auth import mint_token
from personalkv.config import ServerSettings, ServiceSettings, Settings
from tests.integration.api.conftest import AUTH
from tests.plugins.models import get_tiny

pytestmark = pytest.mark.slow

CALLS = 16


@pytest.fixture
def small_queue(tmp_path):
    from personalkv.bootstrap import bootstrap
    from services.answering.server import build_server

    settings = Settings(
        service=ServiceSettings(data_dir=str(tmp_path), answer_queue_size=2, answer_max_batch=2),
        auth=AUTH, server=ServerSettings(max_workers=4, grace_s=1.0))
    services = bootstrap(settings.embedded(), adapter=get_tiny("qwen2_vl"))
    server = build_server(services, port=0, settings=settings.server, auth=AUTH)
    port = server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=1.0)
    services.close()


def test_overload_refuses_with_resource_exhausted_and_answers_every_accepted_ask(small_queue):
    client = PersonalKVClient(small_queue, small_queue, mint_token("olga", settings=AUTH), timeout_s=300)
    gate = threading.Barrier(CALLS)
    outcomes: list = [None] * CALLS

    def ask(i):
        gate.wait()
        started = time.perf_counter()
        try:
            reply = client.ask("Tell me a long story about my things.", max_new_tokens=256)
            outcomes[i] = ("ok", reply.answer, time.perf_counter() - started)
        except grpc.RpcError as err:
            outcomes[i] = (err.code(), err.details(), time.perf_counter() - started)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(CALLS)]
    for t in threads:
        t.start()
    with grpc.insecure_channel(small_queue) as channel:  # health, while the Asks are in
        time.sleep(0.3)
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    for t in threads:
        t.join(timeout=600)
    client.close()
    refused = [o for o in outcomes if o[0] != "ok"]
    answered = [o for o in outcomes if o[0] == "ok"]
    assert len(refused) + len(answered) == CALLS
    assert refused and len(answered) >= 4, outcomes  # at least the 2 + 2 it holds
    for code, details, _ in refused:
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry" in details
    # a refusal does no model work: far faster than any answer (no absolute time: loaded CI)
    assert max(o[2] for o in refused) < min(o[2] for o in answered)
