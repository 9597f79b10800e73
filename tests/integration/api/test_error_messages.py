"""Client-safe messages: an ingestion server whose object store is a dead S3 endpoint answers
UNAVAILABLE with what failed, that a retry may help, and a request id; the endpoint and the
library's error text are only in the server's log, under that id."""

from __future__ import annotations

import logging
import re

import grpc

from personalkv.api.client import PersonalKVClient
from personalkv.auth import mint_token
from personalkv.config import ServerSettings, Settings, StorageSettings
from personalkv.devstack.s3 import free_port
from tests.integration.api.conftest import AUTH, status_of


def test_unavailable_message_names_no_endpoint_and_carries_a_logged_request_id(tmp_path, caplog):
    from personalkv.bootstrap import bootstrap
    from personalkv.service_layer.task_queue import InProcessTaskQueue
    from services.ingestion.server import build_server

    dead = f"127.0.0.1:{free_port()}"
    settings = Settings(storage=StorageSettings(url=f"s3://bucket?endpoint={dead}&secure=false",
                                                connect_timeout_s=0.2, retries=0), auth=AUTH)
    svc = bootstrap(settings, task_queue=InProcessTaskQueue(synchronous=True))
    server = build_server(svc, port=0, settings=ServerSettings(max_workers=4), auth=AUTH)
    port = server.start()
    client = PersonalKVClient(f"127.0.0.1:{port}", f"127.0.0.1:{port}",
                              mint_token("dora", settings=AUTH), timeout_s=30)
    try:
        with caplog.at_level(logging.WARNING, logger="personalkv.api.errors"):
            code, message = status_of(lambda: client.get_concept("kite"))
    finally:
        client.close()
        server.stop(grace=0.5)
        svc.close()
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "object store is unavailable; retry later" in message
    assert dead not in message and "127.0.0.1" not in message
    assert not re.search(r"HTTPConnectionPool|urllib3|Max retries|Errno", message), message
    request_id = re.search(r"request id ([0-9a-f]{12})", message).group(1)
    logged = [r for r in caplog.records if getattr(r, "request_id", None) == request_id]
    assert len(logged) == 1 and dead in logged[0].getMessage()
