"""Graceful shutdown and transport limits, on servers of their own over the shared Services."""

from __future__ import annotations

import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from personalkv.api.client import PersonalKVClient
from personalkv.api.v1 import ingestion_pb2
from personalkv.config import ServerSettings
from services.answering.server import build_server as build_answering
from services.ingestion.server import build_server as build_ingestion
from tests.integration.api.conftest import AUTH, png, status_of


def test_graceful_shutdown_lets_in_flight_calls_finish(api):
    server = build_answering(api.services, port=0, settings=ServerSettings(grace_s=30), auth=AUTH)
    port = server.start()
    client = PersonalKVClient(api.ingestion_addr, f"127.0.0.1:{port}", api.token("gina"))
    outcome: dict = {"events": []}
    in_flight = threading.Event()

    def long_ask():
        # A stream, so that the test knows the call is being served (its first event arrived)
        # before it stops the server: a fixed sleep raced the call's arrival on a busy machine.
        try:
            for event in client.ask_stream("tell me a long story", max_new_tokens=120,
                                           timeout_s=120):
                outcome["events"].append((event, time.monotonic()))
                in_flight.set()
        except grpc.RpcError as err:
            outcome["error"] = err
        finally:
            in_flight.set()

    def stop():
        outcome["stop_at"] = time.monotonic()
        server.stop()

    caller = threading.Thread(target=long_ask)
    caller.start()
    assert in_flight.wait(120), "the Ask never started streaming"
    stopper = threading.Thread(target=stop)
    stopper.start()
    caller.join(120)
    stopper.join(120)
    assert "error" not in outcome, outcome.get("error")
    events = outcome["events"]
    assert events[0][0].WhichOneof("event") == "text_delta", "answered before the stop began"
    final, replied_at = events[-1]
    assert final.WhichOneof("event") == "final"
    # The call was still in flight when the stop began, and it ran to its end.
    assert replied_at > outcome["stop_at"]
    timings = final.final.timings
    assert timings.decode_ms > 0 and timings.total_ms >= timings.decode_ms
    code, _ = status_of(lambda: client.ask("after the stop", max_new_tokens=1, timeout_s=5))
    assert code == grpc.StatusCode.UNAVAILABLE
    client.close()


def test_health_turns_not_serving_on_stop(api):
    server = build_ingestion(api.services, port=0, settings=ServerSettings(grace_s=2), auth=AUTH)
    port = server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1
        server.health.enter_graceful_shutdown()  # what stop() does first
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 2  # NOT_SERVING
    server.stop(grace=0.5)


def test_message_size_limit_is_resource_exhausted_and_server_keeps_serving(api):
    limit = 64 * 1024
    server = build_ingestion(api.services, port=0,
                             settings=ServerSettings(max_message_bytes=limit), auth=AUTH)
    port = server.start()
    try:
        with PersonalKVClient(f"127.0.0.1:{port}", api.answering_addr, api.token("hank")) as hank:
            hank.create_concept("kite", "Kite")
            code, message = status_of(lambda: hank.upload_photos("kite", [b"\0" * (2 * limit)],
                                                                 chunk_bytes=2 * limit))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and message
            reply = hank.upload_photos("kite", [png(20)], chunk_bytes=16 * 1024)
            assert reply.photos_received == 1
            hank.delete_user_data()
    finally:
        server.stop(grace=0.5)
        api.services.task_queue.wait_idle(60)


def test_metadata_user_id_must_be_the_tokens(api):
    with api.client("ivy") as ivy:
        req = ingestion_pb2.ListConceptsRequest(user_id="ivy")
        assert list(ivy.ingestion.ListConcepts(req, metadata=ivy.metadata, timeout=5).concepts) == []
