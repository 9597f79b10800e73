"""The gRPC health probe: asks a server's grpc.health.v1 whether a service is SERVING.

Who calls what: the image's Docker ``HEALTHCHECK`` (``deploy/docker/Dockerfile``), the Compose
healthchecks (``deploy/compose.yaml``) and the chart's ``helm test`` pods
(``deploy/helm/personalkv/templates/tests/test-health.yaml``) run ``main()``:

    python -m personalkv.api.health --server ingestion|answering
    python -m personalkv.api.health --address HOST:PORT [--service NAME] [--ca CA.pem]

``main()`` calls ``check_health()``, which any code may call too. The statuses it reads are
set by ``personalkv.api.server.GrpcServer``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from personalkv.api.client import open_channel


def check_health(address: str, service: str = "", *, ca_file: str = "", server_name: str = "",
                 timeout_s: float = 5.0) -> bool:
    """Whether grpc.health.v1 at ``address`` reports ``service`` SERVING; TLS when ``ca_file``
    names the CA to trust (``server_name``: the name the certificate carries, if not the host)."""
    root_certificates = None
    if ca_file:
        with open(ca_file, "rb") as f:
            root_certificates = f.read()
    with open_channel(address, root_certificates=root_certificates, server_name=server_name) \
            as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            print(f"{address} {service or '(server)'}: {exc.code().name} {exc.details()}")
            return False
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(f"{address} {service or '(server)'}: {status}")
    return response.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m personalkv.api.health``: exit 0 when SERVING, 1 otherwise.

    ``--server ingestion|answering`` probes this container's own server on 127.0.0.1 from the
    settings: its plaintext health port when TLS is on and one is set, else its gRPC port (over
    TLS with ``--ca``, or trusting its own certificate). ``--address`` probes any server."""
    parser = argparse.ArgumentParser(prog="python -m personalkv.api.health")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--server", choices=["ingestion", "answering"])
    target.add_argument("--address", help="HOST:PORT")
    parser.add_argument("--service", default=None,
                        help="health service name (default with --server: its API service)")
    parser.add_argument("--ca", default="", help="PEM CA to trust: connect with TLS")
    parser.add_argument("--server-name", default="", help="name in the server certificate")
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    address, service, ca = args.address, args.service or "", args.ca
    if args.server:
        from personalkv.config import get_settings  # the command is an entry point

        settings = get_settings().server
        service = args.service if args.service is not None else (
            f"personalkv.v1.{args.server.capitalize()}Service")
        port = getattr(settings, f"{args.server}_port")
        tls = bool(settings.tls_cert_file)
        if tls and settings.health_port:
            port, ca = settings.health_port, ""
        elif tls and not ca:
            ca = settings.tls_cert_file
        address = f"127.0.0.1:{port}"
    return 0 if check_health(address, service, ca_file=ca, server_name=args.server_name,
                             timeout_s=args.timeout) else 1


if __name__ == "__main__":
    sys.exit(main())
