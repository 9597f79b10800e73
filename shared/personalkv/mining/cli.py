"""`personalkv mine` and `personalkv eval recognition`.

    personalkv mine DATASET [--concepts ID ...] [--negatives DIR] [--sheet DIR] [--out FILE]
    personalkv eval recognition DATASET [--json FILE] [--sheets DIR]

DATASET is a folder in the format of ../shared/data/README.md. Other modules may add their own
`eval KIND` by calling :func:`eval_subparsers` in their ``register``.
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

    rec = eval_subparsers(subparsers).add_parser("recognition", help="visual concept recognition")
    rec.add_argument("dataset", type=Path)
    rec.add_argument("--json", type=Path, metavar="FILE", help="write the figures here")
    rec.add_argument("--sheets", type=Path, metavar="DIR", help="write contact sheets here")
    rec.set_defaults(func=run_eval_recognition)


def run_mine(args: argparse.Namespace) -> int:
    from personalkv.config import get_settings
    from personalkv.evaluation.dataset import PHOTO_SUFFIXES, load_dataset
    from personalkv.mining.features import load_rgb
    from personalkv.mining.miner import Miner, build_library
    from personalkv.mining.profile import ProfileWriter
    from personalkv.mining.sheets import write_sheet

    settings = get_settings().mining
    ds = load_dataset(args.dataset)
    photos = {c.concept_id: [load_rgb(p, settings.max_side) for p in c.train] for c in ds.concepts}
    neg_dir = args.negatives or (Path(settings.negative_pool) if settings.negative_pool else None)
    negatives = []
    if neg_dir is not None:
        negatives = [load_rgb(p, settings.max_side) for p in sorted(neg_dir.iterdir())
                     if p.suffix.lower() in PHOTO_SUFFIXES]
    ids = {c.concept_id: [p.name for p in c.train] for c in ds.concepts}
    library = build_library(settings, photos, negatives, ids, progress=lambda s: print(s, file=sys.stderr))
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

    result = evaluate_recognition(load_dataset(args.dataset), get_settings().mining, args.sheets,
                                  log=lambda s: print(s, file=sys.stderr))
    print(format_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return 0


def format_table(r: dict) -> str:
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
