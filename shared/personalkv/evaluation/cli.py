"""`personalkv eval qa DATASET --model MODEL`: profile QA, placed KV chunks vs the prompt
(personalkv.evaluation.qa)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers) -> None:
    from personalkv.mining.cli import eval_subparsers

    qa = eval_subparsers(subparsers).add_parser(
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
