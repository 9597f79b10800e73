"""Both gRPC servers in this process, on free loopback ports, over embedded Services.

Real gRPC (HTTP/2 over loopback), real interceptors, health and reflection; the service layer
runs embedded (local object dir, milvus-lite, in-process tasks) with the tiny Qwen2-VL model.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from PIL import Image

from personalkv.api.client import PersonalKVClient
from personalkv.auth import mint_token
from personalkv.config import AuthSettings, ServerSettings, ServiceSettings, Settings
from tests.plugins.models import get_tiny

AUTH = AuthSettings(secret="integration-test-secret-" + "x" * 16, token_ttl_s=600)
MAX_PHOTO_BYTES = 400_000


def png(seed: int, size=(96, 80), fmt="PNG") -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8"))
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


@dataclass
class ApiStack:
    services: object
    ingestion_addr: str
    answering_addr: str

    def token(self, user: str) -> str:
        return mint_token(user, settings=AUTH)

    def client(self, user: str | None = None, token: str | None = None) -> PersonalKVClient:
        return PersonalKVClient(self.ingestion_addr, self.answering_addr,
                                token if token is not None else self.token(user), timeout_s=60)

    def stored_keys(self, user: str) -> list[str]:
        return list(self.services.store.objects.list(f"users/{user}/"))

    def index_count(self, user: str) -> int:
        keys = self.services.keys
        return sum(self.services.index.count(s, user) for s in (keys.text_space, keys.image_space))


@pytest.fixture(scope="session")
def api(tmp_path_factory):
    from personalkv.bootstrap import bootstrap
    from services.answering.server import build_server as build_answering
    from services.ingestion.server import build_server as build_ingestion

    data = tmp_path_factory.mktemp("api-data")
    settings = Settings(
        service=ServiceSettings(data_dir=str(data), max_photo_bytes=MAX_PHOTO_BYTES,
                                max_photo_pixels=4_000_000),
        auth=AUTH, server=ServerSettings(max_workers=4, grace_s=1.0),
    )  # fmt: skip
    services = bootstrap(settings.embedded(), adapter=get_tiny("qwen2_vl"))
    servers = [build(services, port=0, settings=settings.server, auth=AUTH)
               for build in (build_ingestion, build_answering)]
    ports = [server.start() for server in servers]
    yield ApiStack(services, f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}")
    for server in servers:
        server.stop(grace=1.0)
    services.close()


def status_of(call) -> tuple[grpc.StatusCode, str]:
    """Run `call()`; return the RpcError's (code, details). Fails if the call succeeds."""
    try:
        call()
    except grpc.RpcError as err:
        return err.code(), err.details()
    raise AssertionError("the call succeeded; an error status was expected")
