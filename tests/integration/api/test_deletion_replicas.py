"""Deleted means deleted on every answering replica (issue 30), through gRPC: two answering
servers, each over its own Services (its own chunk cache and live conversations, as two pods
have), sharing the store and the index; DeleteConcept served by the ingestion server. After it
returns, a follow-up on either replica (one holding the conversation live, one that would
rebuild it from its chunk cache) answers FAILED_PRECONDITION, the replicas drop the live KV and
the concept's cached chunks, and a plain Ask no longer retrieves the concept. Deleting the user
ends the other conversations the same way (NOT_FOUND). Staleness: none after DeleteConcept
returns (a turn already in flight then may still finish from the evidence)."""

from __future__ import annotations

import grpc
import pytest

from personalkv.api.client import PersonalKVClient
from tests.integration.api.conftest import AUTH, png, status_of
from tests.plugins.models import get_tiny


@pytest.fixture
def replica(api):
    """A second answering server: its own Services (caches) over the same store and index."""
    from personalkv.bootstrap import bootstrap
    from services.answering.server import build_server

    settings = api.services.settings
    services = bootstrap(settings, adapter=get_tiny("qwen2_vl"))
    services.replace("index", api.services.index)  # one milvus-lite file: share its client
    server = build_server(services, port=0, settings=settings.server, auth=AUTH)
    port = server.start()
    yield services, f"127.0.0.1:{port}"
    server.stop(grace=1.0)
    services.replace("index", None)  # the session's index: not this replica's to close
    services.close()


def test_a_deletion_reaches_every_answering_replica(api, replica):
    services_b, address_b = replica
    token = api.token("fay")
    with api.client(token=token) as a, PersonalKVClient(api.ingestion_addr, address_b, token, timeout_s=60) as b:
        a.create_concept("cup", "Cuppy", "mug", "my white mug with a cat on it")
        a.upload_photos("cup", [png(40), png(41)])
        a.wait_ready("cup", timeout_s=120)
        a.create_concept("rex", "Rex", "dog", "my brown dog")
        a.upload_photos("rex", [png(42)])
        a.wait_ready("rex", timeout_s=120)
        live_a = a.ask("What is Cuppy?", max_new_tokens=3, start_conversation=True).conversation_id
        live_b = b.ask("What is Cuppy?", max_new_tokens=3, start_conversation=True).conversation_id
        cold_b = b.ask("Tell me about Cuppy.", max_new_tokens=3, start_conversation=True).conversation_id
        services_b.conversations.drop("fay", cold_b)  # evicted on B: its next turn would rebuild
        assert any(key[1] == "cup" for key in services_b.chunk_cache._lru)  # noqa: SLF001

        assert a.delete_concept("cup")
        for client, cid in ((a, live_a), (b, live_b), (b, cold_b)):
            code, message = status_of(lambda: client.ask("And its colour?", max_new_tokens=3,
                                                         conversation_id=cid))
            assert code == grpc.StatusCode.FAILED_PRECONDITION and "cup, deleted since" in message
        for services in (api.services, services_b):
            assert not [k for k in services.conversations._entries if k[0] == "fay"]  # noqa: SLF001
            assert not [k for k in services.chunk_cache._lru if k[:2] == ("fay", "cup")]  # noqa: SLF001
        assert "cup" not in {c.concept_id for c in b.ask("What is Cuppy?", max_new_tokens=3).concepts}

        rex = b.ask("What is Rex?", max_new_tokens=3, start_conversation=True).conversation_id
        a.delete_user_data()
        code, _ = status_of(lambda: b.ask("And then?", max_new_tokens=3, conversation_id=rex))
        assert code == grpc.StatusCode.NOT_FOUND
        assert not [k for k in services_b.conversations._entries if k[0] == "fay"]  # noqa: SLF001
