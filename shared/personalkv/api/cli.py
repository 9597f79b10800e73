"""`personalkv serve ingestion|answering` and `personalkv token --user U`.

    personalkv serve ingestion --port 50051      # what `python -m services.ingestion.server` runs
    personalkv token --user alice --ttl 3600     # prints a bearer token for alice
"""

from __future__ import annotations

import argparse
import importlib

SERVERS = {"ingestion": "services.ingestion.server", "answering": "services.answering.server"}


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of both servers (also of `python -m services.<name>.server`)."""
    parser.add_argument("--port", type=int, help="gRPC port (default: PERSONALKV_SERVER_*_PORT)")
    parser.add_argument("--metrics-port", type=int,
                        help="Prometheus port, 0 for none (default: PERSONALKV_SERVER_*_METRICS_PORT)")
    parser.add_argument("--embedded", action="store_true",
                        help="local objects + milvus-lite + in-process tasks (no stack needed)")
    parser.add_argument("--no-warmup", action="store_true",
                        help="answering: load the model on the first Ask, not before SERVING")


def _serve(args: argparse.Namespace) -> int:
    return importlib.import_module(SERVERS[args.service]).run(args)


def _token(args: argparse.Namespace) -> int:
    from personalkv.auth import mint_token

    print(mint_token(args.user, ttl_s=args.ttl))
    return 0


def register(subparsers) -> None:
    serve = subparsers.add_parser("serve", help="run a gRPC server (ingestion or answering)")
    serve.add_argument("service", choices=sorted(SERVERS))
    add_server_arguments(serve)
    serve.set_defaults(func=_serve)

    token = subparsers.add_parser(
        "token", help="mint a bearer token for one user (signed with PERSONALKV_AUTH_SECRET)"
    )
    token.add_argument("--user", required=True, help="the user id the token acts for")
    token.add_argument("--ttl", type=int, default=None, help="lifetime in seconds (default: settings)")
    token.set_defaults(func=_token)
