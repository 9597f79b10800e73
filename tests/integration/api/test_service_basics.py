"""Health, reflection, metrics and the happy path over gRPC (embedded services)."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY

from personalkv.api.v1 import answering_pb2, common_pb2
from tests.integration.api.conftest import png

INGESTION = "personalkv.v1.IngestionService"
ANSWERING = "personalkv.v1.AnsweringService"


def test_health_answers_without_a_token(api):
    for addr, service in ((api.ingestion_addr, INGESTION), (api.answering_addr, ANSWERING)):
        with grpc.insecure_channel(addr) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for name in ("", service):
                reply = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            try:
                stub.Check(health_pb2.HealthCheckRequest(service="nope.Service"), timeout=5)
                raise AssertionError("unknown service answered")
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services_and_serves_their_files(api):
    for addr, service in ((api.ingestion_addr, INGESTION), (api.answering_addr, ANSWERING)):
        with grpc.insecure_channel(addr) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                        reflection_pb2.ServerReflectionRequest(file_containing_symbol=service)]
            replies = list(stub.ServerReflectionInfo(iter(requests), timeout=5))
            names = {s.name for s in replies[0].list_services_response.service}
            assert {service, "grpc.health.v1.Health"} <= names
            assert replies[1].file_descriptor_response.file_descriptor_proto


def _latency_count(service: str, method: str, code: str) -> float:
    return REGISTRY.get_sample_value("personalkv_grpc_request_duration_seconds_count",
                                     {"service": service, "method": method, "code": code}) or 0.0


def test_latency_metrics_by_method_and_code(api):
    before_ok = _latency_count("ingestion", "ListConcepts", "OK")
    before_unauth = _latency_count("ingestion", "ListConcepts", "UNAUTHENTICATED")
    with api.client("metrics-user") as client:
        client.list_concepts()
    with api.client(token="bad") as client:
        try:
            client.list_concepts()
        except grpc.RpcError:
            pass
    assert _latency_count("ingestion", "ListConcepts", "OK") == before_ok + 1
    assert _latency_count("ingestion", "ListConcepts", "UNAUTHENTICATED") == before_unauth + 1


def _answered_count() -> float:
    return REGISTRY.get_sample_value("personalkv_answer_time_to_first_token_seconds_count") or 0.0


def test_every_answered_ask_reaches_the_serving_metrics(api):
    """Unary Ask and AskStream's final result are each reported once; a refused Ask is not."""
    before = _answered_count()
    with api.client("metrics-asker") as client:
        client.ask("hello there", max_new_tokens=3)
        assert _answered_count() == before + 1
        events = list(client.ask_stream("hello there", max_new_tokens=3))
        assert events[-1].WhichOneof("event") == "final"
        assert _answered_count() == before + 2
        try:
            client.ask("", max_new_tokens=3)
            raise AssertionError("an empty question was answered")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _answered_count() == before + 2


def test_full_flow_embedded(api):
    with api.client("carol") as carol:
        created = carol.create_concept("bo", "Bo", "dog", "my corgi, loves the beach")
        assert created.state == common_pb2.CONCEPT_STATE_QUEUED
        up = carol.upload_photos("bo", [png(10), png(11)], chunk_bytes=4096)
        assert up.photos_received == 2 and up.concept.photo_count == 2
        ready = carol.wait_ready("bo", timeout_s=120)
        assert ready.chunk_count > 0 and ready.photo_count == 2
        assert [c.concept_id for c in carol.list_concepts()] == ["bo"]

        reply = carol.ask("What does Bo like?", max_new_tokens=4)
        assert reply.personal_evidence_used and reply.concepts[0].concept_id == "bo"
        assert {c.concept_id for c in reply.chunks} == {"bo"}
        assert reply.timings.total_ms > 0 and reply.timings.prefill_ms > 0
        assert any(c.kind == common_pb2.CHUNK_KIND_PROFILE_TEXT for c in reply.chunks)
        with_photo = carol.ask("Is this Bo?", [png(10)], max_new_tokens=4)
        assert with_photo.personal_evidence_used

        events = list(carol.ask_stream("What does Bo like?", max_new_tokens=4))
        final = events[-1]
        assert final.WhichOneof("event") == "final"
        assert "".join(e.text_delta for e in events[:-1]).strip() == final.final.answer
        assert all(e.WhichOneof("event") == "text_delta" for e in events[:-1])

        # Adding a photo computes only the new photo's chunks.
        old_chunks = {c.chunk_id for c in api.services.store.read_manifest("carol", "bo").chunks}
        carol.upload_photos("bo", [png(12)])
        again = carol.wait_ready("bo", timeout_s=120)
        new_chunks = {c.chunk_id for c in api.services.store.read_manifest("carol", "bo").chunks}
        assert old_chunks < new_chunks and again.photo_count == 3

        deleted = carol.delete_user_data()
        assert deleted.concepts_deleted == 1
        after = carol.ask("What does Bo like?", max_new_tokens=4)
        assert not after.personal_evidence_used and not after.concepts and not after.chunks
        assert api.stored_keys("carol") == [] and api.index_count("carol") == 0
        assert carol.list_concepts() == []


def test_deadline_is_honoured(api):
    with api.client("dave") as dave:
        try:
            dave.ask("hello there", max_new_tokens=200, timeout_s=0.05)
            raise AssertionError("an Ask of 200 tokens finished in 50 ms")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        try:
            list(dave.ask_stream("hello there", max_new_tokens=200, timeout_s=0.05))
            raise AssertionError("an AskStream of 200 tokens finished in 50 ms")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert isinstance(dave.ask("hello", max_new_tokens=1), answering_pb2.AskResponse)


def test_two_users_with_the_same_concept_id_see_only_their_own(api):
    with api.client("kim") as kim, api.client("lee") as lee:
        for client, seed, info in ((kim, 30, "kim's red kite"), (lee, 31, "lee's green kite")):
            client.create_concept("kite", "Kite", "toy", info)
            client.upload_photos("kite", [png(seed)])
        kim_ready, lee_ready = kim.wait_ready("kite"), lee.wait_ready("kite")
        assert kim_ready.facts.info == "kim's red kite" and lee_ready.facts.info == "lee's green kite"
        kim_chunks = {c.chunk_id for c in api.services.store.read_manifest("kim", "kite").chunks}
        lee_chunks = {c.chunk_id for c in api.services.store.read_manifest("lee", "kite").chunks}
        assert not kim_chunks & lee_chunks  # chunk ids are per owner, even for equal content
        for client, own in ((kim, kim_chunks), (lee, lee_chunks)):
            reply = client.ask("Where is my kite?", [png(30)], max_new_tokens=2)
            used = {c.chunk_id for c in reply.chunks}
            assert used and used <= own
        kim.delete_user_data()
        assert lee.get_concept("kite").state == common_pb2.CONCEPT_STATE_READY
        lee.delete_user_data()
