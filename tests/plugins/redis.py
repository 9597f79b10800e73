"""Redis fixture (owned by the service layer's Celery tests).

  redis_server   session: one real redis-server on a free loopback port (skips when the
                 Debian package is not installed; .ci/run installs it); yields its URL.
                 PERSONALKV_TEST_REDIS_URL uses a server that is already running instead.
"""

from __future__ import annotations

import os
import shutil

import pytest


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> str:
    if os.environ.get("PERSONALKV_TEST_REDIS_URL"):
        yield os.environ["PERSONALKV_TEST_REDIS_URL"]
        return
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install -y redis-server)")
    from personalkv.devstack.redis import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server.url
    server.stop()
