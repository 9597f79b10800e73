"""The committed stubs in personalkv/api/v1 are what `make proto` makes from protos/."""

from __future__ import annotations

import pytest

from personalkv.api import protogen


def test_committed_stubs_are_fresh():
    pytest.importorskip("grpc_tools", reason="grpcio-tools comes with the test extra")
    stale = protogen.stale_files()
    assert not stale, f"stale generated stubs: {stale}; run `make proto` and commit"


def test_stubs_import_as_personalkv_api_v1_and_name_the_v1_package():
    from personalkv.api.v1 import answering_pb2, ingestion_pb2

    assert ingestion_pb2.DESCRIPTOR.package == "personalkv.v1"
    assert set(ingestion_pb2.DESCRIPTOR.services_by_name) == {"IngestionService"}
    assert set(answering_pb2.DESCRIPTOR.services_by_name["AnsweringService"].methods_by_name) == {
        "Ask", "AskStream", "ListConversations", "EndConversation"}
