"""The commands that run on a dataset folder (the format of ../shared/data/README.md):

* ``personalkv mine DATASET [--concepts ID ...] [--negatives DIR] [--sheet DIR] [--out FILE]``:
  each concept's distinct patches and profile, with contact sheets.
* ``personalkv eval recognition DATASET [--json FILE] [--sheets DIR]``: the mining recognizer
  (``personalkv.evaluation.recognition``).
* ``personalkv eval qa DATASET --model MODEL``: profile QA, placed KV chunks vs the prompt
  (``personalkv.evaluation.qa``).
* ``personalkv eval grounded DATASET --questions FILE --model MODEL``: grounded profile QA and
  binding across placed concepts (``personalkv.evaluation.grounded``).
* ``personalkv eval ask DATASET [--json FILE] [--sheet PNG] [--half 0|1] [--work-dir DIR]``:
  recognition through Ask (``personalkv.evaluation.ask``), at the configured settings.

Progress goes to stderr, the tables to stdout. They live here, not beside the code they drive,
so that the library's packages never depend on ``evaluation`` (it depends on them).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def eval_subparsers(subparsers):
    """The shared `eval` command's sub-parsers (created on first use)."""
    if "eval" not in subparsers.choices:
        parser = subparsers.add_parser("eval", help="evaluations on a dataset")
        parser._eval_kinds = parser.add_subparsers(dest="eval_kind", required=True)
    return subparsers.choices["eval"]._eval_kinds


def register(subparsers) -> None:
    mine = subparsers.add_parser("mine", help="mine each concept's distinct patches and profile")
    mine.add_argument("dataset", type=Path, help="dataset folder (concepts/<id>/train/*.jpg)")
    mine.add_argument("--concepts", nargs="*", help="concept ids to mine (default: all)")
    mine.add_argument("--negatives", type=Path, help="folder of generic negative photos")
    mine.add_argument("--sheet", type=Path, metavar="DIR", help="write a contact-sheet PNG per concept here")
    mine.add_argument("--out", type=Path, help="write profiles and patches as JSON here")
    mine.set_defaults(func=run_mine)

    evals = eval_subparsers(subparsers)
    rec = evals.add_parser("recognition", help="visual concept recognition")
    rec.add_argument("dataset", type=Path, help="dataset folder (concepts/<id>/train|test/*.jpg)")
    rec.add_argument("--json", type=Path, metavar="FILE", help="write the figures here")
    rec.add_argument("--sheets", type=Path, metavar="DIR", help="write contact sheets here")
    rec.set_defaults(func=run_eval_recognition)

    qa = evals.add_parser(
        "qa", help="multiple-choice profile QA: none / prompt / placed chunks, KL and TTFT over r")
    qa.add_argument("dataset", type=Path, help="dataset folder with questions.jsonl (text_mc)")
    qa.add_argument("--model", default=None, help="model name (default PERSONALKV_MODEL_NAME), e.g. smollm2")
    qa.add_argument("--json", type=Path, metavar="FILE", help="write the report here")
    qa.add_argument("--png", type=Path, metavar="FILE", help="write the figure here")
    qa.add_argument("--max-concepts", type=int, default=None, help="only the first N concepts")
    qa.add_argument("--max-questions", type=int, default=None, help="per concept")
    qa.add_argument("--ratios", type=float, nargs="+", default=None, help="recompute shares")
    qa.add_argument("--strategies", nargs="+", default=["deviation", "first", "query", "salience"],
                    help="recompute strategies compared (deviation, first, query, salience)")
    qa.add_argument("--k", type=int, default=3, help="concepts per multi-chunk context")
    qa.add_argument("--big-tokens", type=int, default=2088,
                    help="evidence tokens of the timing-only many-chunk condition (0: skip)")
    qa.add_argument("--big-chunks", type=int, default=10,
                    help="chunks the --big-tokens evidence is split into")
    qa.add_argument("--big-questions", type=int, default=4, help="questions timed at that size")
    qa.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    qa.set_defaults(func=run_eval_qa)

    g = evals.add_parser(
        "grounded", help="grounded profile QA: none / prompt / placed at 1, 3 and 10 concepts, binding")
    g.add_argument("dataset", type=Path, help="dataset folder (concepts/<id>/profile.json)")
    g.add_argument("--questions", type=Path, default=None,
                   help="grounded questions (JSON lines; default: the dataset's own, filtered by the rule)")
    g.add_argument("--profiles", type=Path, default=None,
                   help="the concepts' facts as JSON {id: {category, info}} (datasets without profiles)")
    g.add_argument("--model", default=None, help="model name (default PERSONALKV_MODEL_NAME), e.g. qwen2.5-0.5b")
    g.add_argument("--ratios", type=float, nargs="+", default=None,
                   help="recompute shares besides the configured default")
    g.add_argument("--max-questions", type=int, default=None, help="only the first N questions")
    g.add_argument("--per-concept", type=int, default=None, help="at most N questions per concept")
    g.add_argument("--json", type=Path, metavar="FILE", help="write the report here")
    g.add_argument("--png", type=Path, metavar="FILE", help="write the figure here")
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    g.set_defaults(func=run_eval_grounded)

    p = evals.add_parser(
        "ask", help="ingest a dataset as one user, then Ask's retrieval for its photos and names")
    p.add_argument("dataset", type=Path, help="dataset folder (concepts/<id>/train|test/*.jpg)")
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


def _write_report(args: argparse.Namespace, report: dict, write_png) -> None:
    """``--json`` and ``--png`` of an evaluation command, where given."""
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    if args.png:
        write_png(report, args.png)


def run_eval_qa(args: argparse.Namespace) -> int:
    from personalkv.config import get_settings
    from personalkv.evaluation.qa import DEFAULT_RATIOS, evaluate, format_table, write_png

    settings = get_settings()  # the command is an entry point
    report = evaluate(
        args.dataset, args.model or settings.model.name, settings,
        ratios=tuple(args.ratios or DEFAULT_RATIOS), strategies=tuple(args.strategies), k=args.k,
        max_concepts=args.max_concepts, max_questions=args.max_questions,
        big_tokens=args.big_tokens, big_pieces=args.big_chunks, big_questions=args.big_questions,
        threads=args.threads,
    )
    print(format_table(report))
    keys = ("placed_vs_prompt_identical", "placed_vs_prompt_max_kl", "placed3_kl_mean",
            "placed3_identical", "ttft_ratio_prompt3_over_placed3", "accuracy_none", "accuracy_prompt1",
            "accuracy_placed1", "accuracy_prompt3", "accuracy_placed3")
    print("\n" + "  ".join(f"{k}={report[k]:.4g}" for k in keys if k in report))
    _write_report(args, report, write_png)
    return 0


def run_eval_grounded(args: argparse.Namespace) -> int:
    from personalkv.config import get_settings
    from personalkv.evaluation.grounded import evaluate_grounded, format_table, write_png

    settings = get_settings()  # the command is an entry point
    report = evaluate_grounded(
        args.dataset, args.model or settings.model.name, settings, questions_path=args.questions,
        profiles_path=args.profiles, ratios=args.ratios, max_questions=args.max_questions, per_concept=args.per_concept,
        threads=args.threads,
        log=lambda s: print(s, file=sys.stderr, flush=True))
    print(format_table(report))
    _write_report(args, report, write_png)
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
    for key in ("positive_top1", "positive_top1_any", "positive_extra", "negative_reject", "weighted",
                "two_concept_recall", "two_concept_both", "two_concept_recall_photo",
                "three_concept_recall_photo", "named_top1"):
        lines.append(f"  {key:<26}{r[key]:.3f}")
    lines.append(f"  {'seconds_per_query':<26}p50 {q['p50']:.3f}  p95 {q['p95']:.3f} "
                 f"(text only: p50 {t['p50']:.3f})")
    lines.append(f"  {'ingest_seconds_per_photo':<26}{r['ingest_seconds_per_photo']:.2f}")
    if r.get("recognizer_stage_seconds"):
        stages = "  ".join(f"{k} {v:.3f}" for k, v in r["recognizer_stage_seconds"].items())
        lines.append(f"  {'recognizer stages (mean s)':<26}{stages}  "
                     f"views {r.get('recognizer_views_per_photo', 1.0):.2f}")
    if r.get("misses_sheet"):
        lines.append(f"  misses: {r['misses_sheet']}")
    return "\n".join(lines)


def run_mine(args: argparse.Namespace) -> int:
    from personalkv.config import get_settings
    from personalkv.evaluation.dataset import PHOTO_SUFFIXES, load_dataset
    from personalkv.images import rgb_array
    from personalkv.mining.miner import Miner, build_library
    from personalkv.mining.profile import ProfileWriter
    from personalkv.mining.sheets import write_sheet
    from personalkv.bootstrap import default_adapter_factory

    base = get_settings()  # the command is an entry point
    settings = base.mining
    ds = load_dataset(args.dataset)
    photos = {c.concept_id: [rgb_array(p, settings.max_side) for p in c.train] for c in ds.concepts}
    neg_dir = args.negatives or (Path(settings.negative_pool) if settings.negative_pool else None)
    negatives = []
    if neg_dir is not None:
        negatives = [rgb_array(p, settings.max_side) for p in sorted(neg_dir.iterdir())
                     if p.suffix.lower() in PHOTO_SUFFIXES]
    ids = {c.concept_id: [p.name for p in c.train] for c in ds.concepts}
    library = build_library(settings, photos, negatives, ids, progress=lambda s: print(s, file=sys.stderr),
                            adapter=default_adapter_factory(base))  # loads only if asked
    miner, writer = Miner(library, settings), ProfileWriter()
    out = {}
    for c in ds.concepts:
        if args.concepts and c.concept_id not in args.concepts:
            continue
        mined = miner.mine(c.concept_id, photos[c.concept_id], c.info)
        profile = writer.write(c.name, c.category, c.info)
        out[c.concept_id] = {
            "profile": profile.model_dump(),
            "patches": [{"photo_id": p.photo_id, "box": p.box, "score": p.score, "scores": p.scores}
                        for p in mined.patches],
        }
        if args.sheet:
            path = write_sheet(args.sheet / f"{c.concept_id}.png", photos[c.concept_id], mined, c.concept_id)
            print(f"{c.concept_id}: {len(mined.patches)} patches, sheet {path}")
        else:
            print(f"{c.concept_id}: {len(mined.patches)} patches")
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))
    return 0


def run_eval_recognition(args: argparse.Namespace) -> int:
    from personalkv.config import get_settings
    from personalkv.evaluation.dataset import load_dataset
    from personalkv.evaluation.recognition import evaluate_recognition
    from personalkv.bootstrap import default_adapter_factory

    settings = get_settings()  # the command is an entry point
    result = evaluate_recognition(load_dataset(args.dataset), settings.mining, args.sheets,
                                  log=lambda s: print(s, file=sys.stderr),
                                  adapter=default_adapter_factory(settings))  # loads only if asked
    print(format_recognition_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return 0


def format_recognition_table(r: dict) -> str:
    lines = [f"recognition on {r['dataset']} ({r['concepts']} concepts)",
             f"{'split':<22}{'thr':>7}{'pos_top1':>10}{'neg_rej':>9}{'weighted':>10}"]
    for name, h in r["halves"].items():
        m = h["held_out"]
        lines.append(f"{name + ' -> other':<22}{h['threshold']:>7.2f}{m['positive_top1']:>10.3f}"
                     f"{m['negative_reject']:>9.3f}{m['weighted']:>10.3f}")
    d = r["at_default_threshold"]
    lines.append(f"{'default threshold':<22}{d['threshold']:>7.2f}{d['positive_top1']:>10.3f}"
                 f"{d['negative_reject']:>9.3f}{d['weighted']:>10.3f}")
    lines.append(f"{'total (cross-half)':<22}{'':>7}{r['positive_top1']:>10.3f}{r['negative_reject']:>9.3f}{r['weighted']:>10.3f}")
    lines.append(f"top-1 before rejection {r['positive_top1_any']:.3f}; {r['seconds_per_photo']:.2f} s/photo; "
                 f"mining {r['mining_seconds']:.0f} s")
    return "\n".join(lines)
