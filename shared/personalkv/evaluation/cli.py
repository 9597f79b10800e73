"""The evaluation commands beside ``personalkv eval recognition`` (mining.cli):

* ``personalkv eval qa DATASET --model MODEL``: profile QA, placed KV chunks vs the prompt
  (``personalkv.evaluation.qa``).
* ``personalkv eval ask DATASET [--json FILE] [--sheet PNG] [--half 0|1] [--work-dir DIR]``:
  recognition through Ask (``personalkv.evaluation.ask``), at the configured settings.

Progress goes to stderr, the tables to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers) -> None:
    from personalkv.mining.cli import eval_subparsers

    evals = eval_subparsers(subparsers)
    qa = evals.add_parser(
        "qa", help="multiple-choice profile QA: none / prompt / placed chunks, KL and TTFT over r")
    qa.add_argument("dataset", type=Path, help="dataset folder with questions.jsonl (text_mc)")
    qa.add_argument("--model", default=None, help="model name (default PERSONALKV_MODEL_NAME), e.g. smollm2")
    qa.add_argument("--json", type=Path, metavar="FILE", help="write the report here")
    qa.add_argument("--png", type=Path, metavar="FILE", help="write the figure here")
    qa.add_argument("--max-concepts", type=int, default=None)
    qa.add_argument("--max-questions", type=int, default=None, help="per concept")
    qa.add_argument("--ratios", type=float, nargs="+", default=None, help="recompute shares")
    qa.add_argument("--strategies", nargs="+", default=["deviation", "first"])
    qa.add_argument("--k", type=int, default=3, help="concepts per multi-chunk context")
    qa.add_argument("--big-tokens", type=int, default=2088,
                    help="evidence tokens of the timing-only many-chunk condition (0: skip)")
    qa.add_argument("--big-chunks", type=int, default=10)
    qa.add_argument("--big-questions", type=int, default=4, help="questions timed at that size")
    qa.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    qa.set_defaults(func=run_eval_qa)

    p = evals.add_parser(
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


def run_eval_qa(args: argparse.Namespace) -> int:
    from personalkv.config import get_settings
    from personalkv.evaluation.qa import DEFAULT_RATIOS, evaluate, format_table, write_png

    report = evaluate(
        args.dataset, args.model or get_settings().model.name,
        ratios=tuple(args.ratios or DEFAULT_RATIOS), strategies=tuple(args.strategies), k=args.k,
        max_concepts=args.max_concepts, max_questions=args.max_questions,
        big_tokens=args.big_tokens, big_pieces=args.big_chunks, big_questions=args.big_questions,
        threads=args.threads,
    )
    print(format_table(report))
    keys = ("placed_vs_prompt_identical", "placed_vs_prompt_max_kl", "placed3_kl_mean",
            "placed3_identical", "ttft_ratio_prompt3_over_placed3")
    print("\n" + "  ".join(f"{k}={report[k]:.4g}" for k in keys if k in report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    if args.png:
        write_png(report, args.png)
    return 0


def run_eval_ask(args: argparse.Namespace) -> int:
    from personalkv.config import get_settings
    from personalkv.evaluation.ask import evaluate_ask
    from personalkv.evaluation.dataset import load_dataset

    sheet = args.sheet or (args.json.with_suffix(".misses.png") if args.json else None)
    result = evaluate_ask(load_dataset(args.dataset), get_settings(), half=args.half,
                          work_dir=args.work_dir, sheet=sheet, reuse=args.reuse,
                          log=lambda s: print(s, file=sys.stderr, flush=True))
    print(format_ask_table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return 0


def format_ask_table(r: dict) -> str:
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
