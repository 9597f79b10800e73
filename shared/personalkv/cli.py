"""The library's `personalkv` subcommands. Each subcommand lives beside the code it drives.

The installed `personalkv` command is ``services/cli.py``: these plus ``serve`` and ``worker``,
which start the processes in ``services/`` (the library never names them).

A command module exposes ``register(subparsers)``, which adds its parser(s) and sets
``func=<callable(args) -> int>``; modules are imported lazily only when listed here, so
`personalkv --help` stays fast and a missing optional dependency only breaks its own command.

Misuse is one line on stderr and a non-zero exit, never a traceback: a bad flag exits 2
(``CommandParser.error``); an error the user can act on (an invalid id, a missing file, a model
that cannot load, a service error, a bad setting; ``user_error_message``) exits 1. Anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from personalkv import __version__

# Errors with a message the user can act on, by (module, class). Looked up in sys.modules: a
# module that was never imported cannot have raised its error, and the CLI need not import it.
USER_ERRORS = (
    ("personalkv.ids", "InvalidIdError"),
    ("personalkv.errors", "ServiceError"),
    ("personalkv.models", "ModelLoadError"),
    ("personalkv.storage.base", "StorageError"),
    ("personalkv.index.base", "IndexUnavailable"),
    ("personalkv.index.base", "IndexRequestError"),
    ("pydantic", "ValidationError"),
)


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (argparse prints the whole usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def user_error_message(exc: BaseException) -> str | None:
    """One line for an error the user can act on; None for anything else (a bug)."""
    if isinstance(exc, OSError):  # a missing or unreadable file or folder, a refused connection
        if exc.strerror and exc.filename is not None:  # "[Errno 21] ..." says less than this
            return f"{exc.filename}: {exc.strerror.lower()}"
        return str(exc)
    for module_name, class_name in USER_ERRORS:
        module = sys.modules.get(module_name)
        error_class = getattr(module, class_name, None) if module is not None else None
        if error_class is None or not isinstance(exc, error_class):
            continue
        if class_name == "ServiceError":
            return f"{exc.code}: {exc.message}"
        if class_name == "ValidationError":  # a bad PERSONALKV_* value
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            return f"invalid setting in {exc.title}: {problems}"
        return " ".join(str(exc).split())
    return None

COMMAND_MODULES = [
    "personalkv.api.cli",  # token
    "personalkv.commands",  # ingest, ask, reindex, recache, demo
    "personalkv.evaluation.cli",  # mine, eval recognition|qa|ask
]


def build_parser(command_modules: list[str] = COMMAND_MODULES) -> argparse.ArgumentParser:
    parser = CommandParser(prog="personalkv", description="PersonalKV command line")
    parser.add_argument("--version", action="version", version=f"personalkv {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in command_modules:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None, command_modules: list[str] = COMMAND_MODULES) -> int:
    from personalkv.config import apply_process_environment, get_settings

    args = build_parser(command_modules).parse_args(argv)
    try:
        apply_process_environment(get_settings())  # before any command loads a model
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        message = user_error_message(exc)
        if message is None:
            raise
        print(f"personalkv {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
