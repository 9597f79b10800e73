"""Connection ageing never cuts accepted work (issue 30): with a max connection age far shorter
than a call, and a configured grace shorter still, a call that runs past both completes OK,
because the server's grace covers its longest accepted call (``longest_call_s``; the answering
server passes its engine's longest wait). Without that cover the same call is cut UNAVAILABLE:
the control that shows the test can fail."""

from __future__ import annotations

import time

import grpc
import pytest

from personalkv.api.server import GrpcServer, connection_options
from personalkv.auth import mint_token
from personalkv.config import AuthSettings, ServerSettings

SLOW_S = 3.0
METHOD = "/personalkv.test.Slow/Call"


def _register(server: grpc.Server) -> None:
    def call(request: bytes, context) -> bytes:
        time.sleep(SLOW_S)
        return b"done"

    handler = grpc.method_handlers_generic_handler("personalkv.test.Slow", {
        "Call": grpc.unary_unary_rpc_method_handler(call)})
    server.add_generic_rpc_handlers((handler,))


def _call_through(longest_call_s: float):
    settings = ServerSettings(host="127.0.0.1", max_connection_age_s=0.5, max_connection_age_grace_s=0.5)
    auth = AuthSettings(secret="age-test-" + "x" * 32)
    server = GrpcServer("age", _register, [], port=0, settings=settings, auth=auth,
                        longest_call_s=longest_call_s)
    port = server.start()
    token = mint_token("alice", settings=auth)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            return channel.unary_unary(METHOD)(b"", timeout=60, metadata=[("authorization", f"Bearer {token}")])
    finally:
        server.stop(0)


def test_an_accepted_call_outlives_the_connection_age():
    assert _call_through(longest_call_s=4 * SLOW_S) == b"done"


def test_without_the_cover_ageing_cuts_the_call():
    with pytest.raises(grpc.RpcError) as caught:
        _call_through(longest_call_s=0.0)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_grace_is_the_longer_of_the_setting_and_the_longest_call():
    options = dict(connection_options(ServerSettings(max_connection_age_grace_s=60), longest_call_s=660))
    assert options["grpc.max_connection_age_grace_ms"] == 660_000
    options = dict(connection_options(ServerSettings(max_connection_age_grace_s=60)))
    assert options["grpc.max_connection_age_grace_ms"] == 60_000
