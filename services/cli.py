"""The ``personalkv`` command (``[project.scripts]``): the library's subcommands
(``personalkv.cli.COMMAND_MODULES``) plus the two that start this package's processes:

  serve ingestion|answering       a gRPC server (``services/<name>/server.py``)
  worker --queue mining|caching   a Celery worker (``services/worker.py``; comma-separate for both)

    python -m services.cli worker --queue caching    # the same, without the installed script
"""

from __future__ import annotations

import importlib
import os
import sys

from personalkv import cli

SERVERS = {"ingestion": "services.ingestion.server", "answering": "services.answering.server"}


def register(subparsers) -> None:
    from personalkv.api.cli import add_server_arguments

    serve = subparsers.add_parser("serve", help="run a gRPC server (ingestion or answering)")
    serve.add_argument("service", choices=sorted(SERVERS), help="which server")
    add_server_arguments(serve)
    serve.set_defaults(func=_serve)

    worker = subparsers.add_parser("worker", help="run a Celery worker (mining or caching)")
    worker.add_argument("--queue", required=True,
                        help="mining, caching, or both comma-separated")
    worker.add_argument("--concurrency", type=int, default=None,
                        help="worker processes (default PERSONALKV_CELERY_WORKER_CONCURRENCY)")
    worker.add_argument("--pool", default="prefork", choices=["prefork", "solo", "threads"],
                        help="Celery execution pool (default prefork)")
    worker.add_argument("--loglevel", default="INFO", help="DEBUG, INFO, WARNING, ...")
    worker.add_argument("--metrics-port", type=int, default=0,
                        help="serve Prometheus /metrics from the process running the tasks "
                        "(the pool child with prefork: use with --concurrency 1)")
    worker.set_defaults(func=_worker)


def _serve(args) -> int:
    return importlib.import_module(SERVERS[args.service]).run(args)


def _worker(args) -> int:
    # SIGTERM -> cold shutdown with the soft-shutdown window (make_celery): the running task goes
    # back to the queue. Read by billiard when it is imported, so set before the app is.
    os.environ.setdefault("REMAP_SIGTERM", "SIGQUIT")
    from services import worker

    return worker.run(args)


COMMAND_MODULES = [*cli.COMMAND_MODULES, __name__]


def build_parser():
    return cli.build_parser(COMMAND_MODULES)


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, COMMAND_MODULES)


if __name__ == "__main__":
    sys.exit(main())
