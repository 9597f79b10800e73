"""The `personalkv` command. Each subcommand lives beside the code it drives.

A command module exposes ``register(subparsers)``, which adds its parser(s) and sets
``func=<callable(args) -> int>``; modules are imported lazily only when listed here, so
`personalkv --help` stays fast and a missing optional dependency only breaks its own command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = [
    "personalkv.api.cli",  # serve ingestion|answering, token
    "personalkv.service.cli",  # worker, ingest, ask, reindex, demo
    "personalkv.mining.cli",  # mine, eval recognition
    "personalkv.evaluation.cli",  # eval qa, eval ask
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="personalkv", description="PersonalKV command line")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
