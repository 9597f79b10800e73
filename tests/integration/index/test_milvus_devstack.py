"""The devstack Milvus server: own ports and data dir per instance, bounded teardown."""

from __future__ import annotations

import time
import urllib.parse

import pytest

from personalkv.devstack.milvus import start_milvus_server


@pytest.mark.slow
def test_second_server_runs_beside_the_session_one_and_stops_in_time(milvus_server, tmp_path):
    pytest.importorskip("milvus")
    server = start_milvus_server(tmp_path / "second")
    try:
        assert server.uri != milvus_server
        assert urllib.parse.urlparse(server.uri).port not in (19530, 19529)
        assert (tmp_path / "second" / "configs" / "etcd.yaml").exists()
        from pymilvus import MilvusClient

        assert MilvusClient(uri=server.uri).list_collections() == []
    finally:
        started = time.monotonic()
        server.stop(timeout_s=20)
        assert time.monotonic() - started < 35
    assert server.process is None
    server.stop()  # idempotent
