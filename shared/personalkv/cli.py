"""The library's `personalkv` subcommands. Each subcommand lives beside the code it drives.

The installed `personalkv` command is ``services/cli.py``: these plus ``serve`` and ``worker``,
which start the processes in ``services/`` (the library never names them).

A command module exposes ``register(subparsers)``, which adds its parser(s) and sets
``func=<callable(args) -> int>``; modules are imported lazily only when listed here, so
`personalkv --help` stays fast and a missing optional dependency only breaks its own command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = [
    "personalkv.api.cli",  # token
    "personalkv.commands",  # ingest, ask, reindex, recache, demo
    "personalkv.evaluation.cli",  # mine, eval recognition|qa|ask
]


def build_parser(command_modules: list[str] = COMMAND_MODULES) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="personalkv", description="PersonalKV command line")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in command_modules:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None, command_modules: list[str] = COMMAND_MODULES) -> int:
    from personalkv.config import apply_process_environment, get_settings

    args = build_parser(command_modules).parse_args(argv)
    apply_process_environment(get_settings())  # before any command loads a model
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
