"""`make bench`: run every benchmark, print a short table each, write benchmarks/results/<name>.json.

A benchmark is a module in this package listed in BENCHMARKS, with ``NAME`` and
``run() -> dict``; ``run`` returns the figures (flat JSON) and may print progress.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import sys
import time

BENCHMARKS = [
    "benchmarks.kv_core",
    "benchmarks.storage_index",
    "benchmarks.ingest",
    "benchmarks.conversation",
    "benchmarks.serving",
]

RESULTS = pathlib.Path(__file__).parent / "results"


def print_table(name: str, figures: dict) -> None:
    width = max(len(k) for k in figures) if figures else 10
    print(f"\n== {name} ==")
    for key, value in figures.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, (dict, list)):
            continue
        print(f"  {key:<{width}}  {value}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("only", nargs="*", help="benchmark names to run (default: all)")
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    for module_name in BENCHMARKS:
        module = importlib.import_module(module_name)
        if args.only and module.NAME not in args.only:
            continue
        started = time.perf_counter()
        figures = module.run()
        figures["benchmark_seconds"] = round(time.perf_counter() - started, 2)
        (RESULTS / f"{module.NAME}.json").write_text(json.dumps(figures, indent=2) + "\n")
        print_table(module.NAME, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
