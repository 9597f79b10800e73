"""`personalkv token --user U`, and the options of `personalkv serve` (``services/cli.py``).

    personalkv token --user alice --ttl 3600     # prints a bearer token for alice
"""

from __future__ import annotations

import argparse


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of both gRPC servers (`personalkv serve NAME` and each server's own module)."""
    parser.add_argument("--port", type=int, help="gRPC port (default: PERSONALKV_SERVER_*_PORT)")
    parser.add_argument("--metrics-port", type=int,
                        help="Prometheus port, 0 for none (default: PERSONALKV_SERVER_*_METRICS_PORT)")
    parser.add_argument("--embedded", action="store_true",
                        help="local objects + milvus-lite + in-process tasks (no stack needed)")
    parser.add_argument("--no-warmup", action="store_true",
                        help="answering: load the model on the first Ask, not before SERVING")


def _token(args: argparse.Namespace) -> int:
    from personalkv.auth import mint_token
    from personalkv.config import get_settings  # the command is an entry point
    from personalkv.errors import InvalidArgument

    settings = get_settings().auth
    if args.ttl is not None and not 0 < args.ttl <= settings.max_token_lifetime_s:
        raise InvalidArgument(f"--ttl must be between 1 and {settings.max_token_lifetime_s} s "
                              "(PERSONALKV_AUTH_MAX_TOKEN_LIFETIME_S)")
    print(mint_token(args.user, ttl_s=args.ttl, settings=settings))
    return 0


def register(subparsers) -> None:
    token = subparsers.add_parser(
        "token", help="mint a bearer token for one user (signed with PERSONALKV_AUTH_SECRET)"
    )
    token.add_argument("--user", required=True, help="the user id the token acts for")
    token.add_argument("--ttl", type=int, default=None, help="lifetime in seconds (default: settings)")
    token.set_defaults(func=_token)
