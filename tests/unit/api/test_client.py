"""The Python client's transport choices: addresses, TLS by scheme, and gRPC's retry policy
(against a real gRPC server on loopback whose handler answers UNAVAILABLE a set number of times)."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest

from personalkv.api.client import RETRY_POLICY, PersonalKVClient, parse_address
from personalkv.api.v1 import ingestion_pb2


@pytest.mark.parametrize(("address", "expected"), [
    ("https://pkv.example.com", ("pkv.example.com:443", True)),
    ("https://pkv.example.com:8443/", ("pkv.example.com:8443", True)),
    ("http://127.0.0.1", ("127.0.0.1:80", False)),
    ("http://[::1]:50051", ("[::1]:50051", False)),
    ("127.0.0.1:50051", ("127.0.0.1:50051", False)),
])
def test_addresses(address, expected):
    assert parse_address(address) == expected


@pytest.mark.parametrize("address", ["grpc://h:1", "https://h:1/v1", "https://"])
def test_bad_addresses_are_refused(address):
    with pytest.raises(ValueError, match="use https://HOST"):
        parse_address(address)


class _Flaky:
    """ListConcepts answers ``code`` for the first ``failures`` calls, then an empty list."""

    def __init__(self, failures: int, code: grpc.StatusCode):
        self.failures, self.code, self.calls = failures, code, 0

    def list_concepts(self, request, context):
        self.calls += 1
        if self.calls <= self.failures:
            context.abort(self.code, f"attempt {self.calls} refused")
        return ingestion_pb2.ListConceptsResponse()


@pytest.fixture
def flaky_server():
    servers = []

    def start(failures: int, code: grpc.StatusCode) -> tuple[str, _Flaky]:
        handler = _Flaky(failures, code)
        server = grpc.server(futures.ThreadPoolExecutor(2))
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "personalkv.v1.IngestionService", {"ListConcepts": grpc.unary_unary_rpc_method_handler(
                handler.list_concepts,
                request_deserializer=ingestion_pb2.ListConceptsRequest.FromString,
                response_serializer=ingestion_pb2.ListConceptsResponse.SerializeToString)})])
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}", handler

    yield start
    for server in servers:
        server.stop(0)


def test_unavailable_is_retried_until_it_succeeds(flaky_server):
    address, handler = flaky_server(RETRY_POLICY["maxAttempts"] - 1, grpc.StatusCode.UNAVAILABLE)
    with PersonalKVClient(address, address, "token", timeout_s=30) as client:
        assert client.list_concepts() == []
    assert handler.calls == RETRY_POLICY["maxAttempts"]


def test_retries_stop_at_max_attempts_and_only_unavailable_is_retried(flaky_server):
    address, handler = flaky_server(100, grpc.StatusCode.UNAVAILABLE)
    with PersonalKVClient(address, address, "token", timeout_s=30) as client, \
            pytest.raises(grpc.RpcError) as failed:
        client.list_concepts()
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert handler.calls == RETRY_POLICY["maxAttempts"]

    address, handler = flaky_server(1, grpc.StatusCode.RESOURCE_EXHAUSTED)
    with PersonalKVClient(address, address, "token", timeout_s=30) as client, \
            pytest.raises(grpc.RpcError) as failed:
        client.list_concepts()
    assert failed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and handler.calls == 1


def test_retry_can_be_turned_off(flaky_server):
    address, handler = flaky_server(1, grpc.StatusCode.UNAVAILABLE)
    with PersonalKVClient(address, address, "token", timeout_s=30, retry=False) as client, \
            pytest.raises(grpc.RpcError):
        client.list_concepts()
    assert handler.calls == 1
