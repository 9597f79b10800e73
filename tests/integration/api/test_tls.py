"""The gRPC transport of personalkv.api.server on real loopback sockets: TLS from PEM files
(a client trusting the CA is served; plaintext and a client trusting another CA are refused),
the plaintext health-only port for Kubernetes' probes, certificate rotation without a restart,
and max connection age (the server sends GOAWAY, the client's channel drops to IDLE).

A server here registers no PersonalKV service: health (no token needed) is what the transport
carries, and the servicers are covered by the other API tests.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import threading
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from personalkv.api.server import GrpcServer
from personalkv.config import AuthSettings, ServerSettings

AUTH = AuthSettings(secret="tls-test-secret-" + "x" * 24)
SERVICE = "personalkv.v1.IngestionService"
SERVING = health_pb2.HealthCheckResponse.SERVING


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(cn: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def issue(ca, folder: Path, serial_cn: str = "localhost") -> tuple[str, str]:
    """A server certificate for localhost / 127.0.0.1 signed by `ca`; returns (cert, key) paths."""
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                       x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (x509.CertificateBuilder().subject_name(_name(serial_cn))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(san, critical=False).sign(ca_key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "tls.crt", folder / "tls.key"
    # Written as a rotation would be (new files renamed into place), so mtimes change.
    for path, data in ((cert_path, cert.public_bytes(serialization.Encoding.PEM)),
                       (key_path, _pem_key(key))):
        tmp = path.with_suffix(".new")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return str(cert_path), str(key_path)


def ca_pem(ca) -> bytes:
    return ca[1].public_bytes(serialization.Encoding.PEM)


def health_check(channel: grpc.Channel, service: str = SERVICE, timeout: float = 10.0):
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout).status


def start_server(**settings) -> GrpcServer:
    server = GrpcServer("tls-test", register=lambda s: None, service_names=[SERVICE], port=0,
                        settings=ServerSettings(**settings), auth=AUTH)
    server.start()
    return server


@pytest.fixture
def ca():
    return make_ca("personalkv-test-ca")


def test_tls_server_serves_a_client_with_the_ca_and_refuses_plaintext(ca, tmp_path):
    cert, key = issue(ca, tmp_path / "tls")
    server = start_server(tls_cert_file=cert, tls_key_file=key)
    address = f"localhost:{server.port}"
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=ca_pem(ca))
        with grpc.secure_channel(address, creds) as channel:
            assert health_check(channel) == SERVING

        with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as plain:
            health_check(channel, timeout=5)
        assert plain.value.code() == grpc.StatusCode.UNAVAILABLE

        other = grpc.ssl_channel_credentials(root_certificates=ca_pem(make_ca("another-ca")))
        with grpc.secure_channel(address, other) as channel, pytest.raises(grpc.RpcError) as bad:
            health_check(channel, timeout=5)
        assert bad.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(grace=0)


def test_the_python_client_speaks_tls_when_given_the_ca(ca, tmp_path):
    from personalkv.api.client import PersonalKVClient
    from personalkv.auth import mint_token

    cert, key = issue(ca, tmp_path / "tls")
    server = start_server(tls_cert_file=cert, tls_key_file=key)
    address = f"localhost:{server.port}"
    token = mint_token("tina", settings=AUTH)
    try:
        # The server registers no API service: a call that arrives (handshake done, token
        # checked) is UNIMPLEMENTED; one that cannot connect is UNAVAILABLE.
        with PersonalKVClient(address, address, token, timeout_s=10,
                              root_certificates=ca_pem(ca)) as client, \
                pytest.raises(grpc.RpcError) as arrived:
            client.list_concepts()
        assert arrived.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with PersonalKVClient(address, address, token, timeout_s=5) as plain, \
                pytest.raises(grpc.RpcError) as refused:
            plain.list_concepts()
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(grace=0)


def test_plaintext_health_port_carries_health_only(ca, tmp_path):
    cert, key = issue(ca, tmp_path / "tls")
    # Port 0 is "off" in the settings, so ask for a concrete free port.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    server = start_server(tls_cert_file=cert, tls_key_file=key, health_port=free)
    try:
        assert server.health_port == free
        with grpc.insecure_channel(f"127.0.0.1:{free}") as channel:
            assert health_check(channel) == SERVING
            assert health_check(channel, service="") == SERVING
            # Nothing else is served there: reflection (and every API service) is unimplemented.
            from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            with pytest.raises(grpc.RpcError) as err:
                list(stub.ServerReflectionInfo(iter([request]), timeout=5))
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        server.stop(grace=0)
        # Shutdown turns it NOT_SERVING and closes the port with the server.
        with grpc.insecure_channel(f"127.0.0.1:{free}") as channel, pytest.raises(grpc.RpcError):
            health_check(channel, timeout=3)
    finally:
        server.stop(grace=0)


def test_rotated_certificate_is_served_without_a_restart(ca, tmp_path):
    cert, key = issue(ca, tmp_path / "tls")
    server = start_server(tls_cert_file=cert, tls_key_file=key)
    address = f"localhost:{server.port}"
    try:
        rotated_ca = make_ca("rotated-ca")
        time.sleep(0.05)  # distinct mtimes even on coarse-grained filesystems
        issue(rotated_ca, tmp_path / "tls")
        creds = grpc.ssl_channel_credentials(root_certificates=ca_pem(rotated_ca))
        with grpc.secure_channel(address, creds) as channel:
            assert health_check(channel) == SERVING
        old = grpc.ssl_channel_credentials(root_certificates=ca_pem(ca))
        with grpc.secure_channel(address, old) as channel, pytest.raises(grpc.RpcError):
            health_check(channel, timeout=5)
    finally:
        server.stop(grace=0)


def test_half_configured_tls_is_refused(tmp_path, ca):
    cert, _ = issue(ca, tmp_path / "tls")
    with pytest.raises(ValueError, match="TLS needs both"):
        GrpcServer("x", register=lambda s: None, service_names=[], port=0,
                   settings=ServerSettings(tls_cert_file=cert), auth=AUTH)


def _states_after_one_call(max_age_s: float, watch_s: float) -> list:
    server = start_server(max_connection_age_s=max_age_s, max_connection_age_grace_s=0.5)
    states, changed = [], threading.Event()

    def record(state):
        states.append(state)
        changed.set()

    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            channel.subscribe(record, try_to_connect=False)
            assert health_check(channel) == SERVING
            deadline = time.monotonic() + watch_s
            while time.monotonic() < deadline:
                if grpc.ChannelConnectivity.READY in states and states[-1] in (
                        grpc.ChannelConnectivity.IDLE,
                        grpc.ChannelConnectivity.TRANSIENT_FAILURE):
                    break
                changed.wait(0.1)
                changed.clear()
            channel.unsubscribe(record)
    finally:
        server.stop(grace=0)
    return states


def test_max_connection_age_makes_the_client_reconnect():
    # 1 s max age (+-10% jitter, plus 0.5 s grace): the server's GOAWAY drops the channel from
    # READY to IDLE; watched for 15 s (a 10x margin for a busy machine).
    aged = _states_after_one_call(1.0, watch_s=15)
    ready_at = aged.index(grpc.ChannelConnectivity.READY)
    assert grpc.ChannelConnectivity.IDLE in aged[ready_at:], aged
    # Without a max age the connection stays READY over the same kind of wait (3 s here).
    kept = _states_after_one_call(0.0, watch_s=3)
    assert kept[-1] == grpc.ChannelConnectivity.READY, kept


def test_health_probe_command_checks_tls_and_plaintext_servers(ca, tmp_path):
    from personalkv.api.health import main as health_main

    cert, key = issue(ca, tmp_path / "tls")
    (tmp_path / "ca.crt").write_bytes(ca_pem(ca))
    tls = start_server(tls_cert_file=cert, tls_key_file=key)
    plain = start_server()
    try:
        address = f"localhost:{tls.port}"
        assert health_main(["--address", address, "--service", SERVICE,
                            "--ca", str(tmp_path / "ca.crt")]) == 0
        assert health_main(["--address", address, "--service", SERVICE, "--timeout", "3"]) == 1
        assert health_main(["--address", f"127.0.0.1:{plain.port}", "--service", SERVICE]) == 0
        assert health_main(["--address", f"127.0.0.1:{plain.port}",
                            "--service", "personalkv.v1.Unknown"]) == 1  # NOT_FOUND
        plain.stop(grace=0)  # NOT_SERVING, then gone
        assert health_main(["--address", f"127.0.0.1:{plain.port}", "--timeout", "3"]) == 1
    finally:
        tls.stop(grace=0)
        plain.stop(grace=0)


def test_an_https_address_speaks_tls_trusting_the_system_roots(ca, tmp_path, monkeypatch):
    """``https://host:port`` with no CA given: TLS verified against the system's CA bundle
    (SSL_CERT_FILE, as for OpenSSL clients; here it holds the test CA)."""
    from personalkv.api.client import PersonalKVClient
    from personalkv.auth import mint_token

    cert, key = issue(ca, tmp_path / "tls")
    bundle = tmp_path / "system-roots.pem"
    bundle.write_bytes(ca_pem(ca))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    server = start_server(tls_cert_file=cert, tls_key_file=key)
    address = f"https://localhost:{server.port}"
    try:
        with PersonalKVClient(address, address, mint_token("tina", settings=AUTH),
                              timeout_s=10) as client, pytest.raises(grpc.RpcError) as arrived:
            client.list_concepts()
        assert arrived.value.code() == grpc.StatusCode.UNIMPLEMENTED  # handshake done
        # Another CA in the system bundle: the server's certificate is not trusted.
        bundle.write_bytes(ca_pem(make_ca("other")))
        with PersonalKVClient(address, address, mint_token("tina", settings=AUTH),
                              timeout_s=10) as client, pytest.raises(grpc.RpcError) as refused:
            client.list_concepts()
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(grace=0)
