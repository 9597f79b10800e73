"""`personalkv eval ask DATASET [--json FILE] [--sheet PNG] [--half 0|1] [--work-dir DIR]`.

Recognition through Ask (``personalkv.evaluation.ask``), at the configured settings. Progress
goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers) -> None:
    from personalkv.mining.cli import eval_subparsers

    p = eval_subparsers(subparsers).add_parser(
        "ask", help="ingest a dataset as one user, then Ask's retrieval for its photos and names")
    p.add_argument("dataset", type=Path)
    p.add_argument("--json", type=Path, metavar="FILE", help="write the figures (and every query) here")
    p.add_argument("--sheet", type=Path, metavar="PNG", help="contact sheet of the misses "
                   "(default: next to --json, else none)")
    p.add_argument("--half", type=int, choices=(0, 1), help="every other concept and negative "
                   "only (0: even indices, 1: odd), to choose settings on one half")
    p.add_argument("--work-dir", type=Path, help="embedded store and index here (kept); "
                   "default a temporary folder, removed")
    p.add_argument("--reuse", action="store_true", help="with --work-dir: concepts an earlier "
                   "run left there are not ingested again (queries only; ingest not measured)")
    p.set_defaults(func=run_eval_ask)


def run_eval_ask(args: argparse.Namespace) -> int:
    from personalkv.config import get_settings
    from personalkv.evaluation.ask import evaluate_ask
    from personalkv.evaluation.dataset import load_dataset

    sheet = args.sheet or (args.json.with_suffix(".misses.png") if args.json else None)
    result = evaluate_ask(load_dataset(args.dataset), get_settings(), half=args.half,
                          work_dir=args.work_dir, sheet=sheet, reuse=args.reuse,
                          log=lambda s: print(s, file=sys.stderr, flush=True))
    print(format_table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return 0


def format_table(r: dict) -> str:
    half = "" if r["half"] is None else f", half {r['half']}"
    q, t = r["seconds_per_query"], r["seconds_per_text_query"]
    lines = [f"Ask on {r['dataset']} ({r['concepts']} concepts{half}; {r['counts']})"]
    for key in ("positive_top1", "positive_top1_any", "negative_reject", "weighted",
                "two_concept_recall", "two_concept_both", "named_top1"):
        lines.append(f"  {key:<26}{r[key]:.3f}")
    lines.append(f"  {'seconds_per_query':<26}p50 {q['p50']:.3f}  p95 {q['p95']:.3f} "
                 f"(text only: p50 {t['p50']:.3f})")
    lines.append(f"  {'ingest_seconds_per_photo':<26}{r['ingest_seconds_per_photo']:.2f}")
    if r.get("misses_sheet"):
        lines.append(f"  misses: {r['misses_sheet']}")
    return "\n".join(lines)
