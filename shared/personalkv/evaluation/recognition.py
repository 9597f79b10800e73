"""Recognition evaluation: one user holds every concept of a dataset (ingested from `train`);
every `test` photo and every negative photo is recognised from the photo alone.

Protocol (no photo is ever scored against a library that contains it):
* negatives are split by index parity into two folds; the library that scores fold ``f`` uses
  the other fold as its generic negative pool; test photos are scored by the fold-0 library;
* the "none" threshold is chosen on half of the concepts (even indices, with the even-index
  negatives) and applied to the other half, and the other way round; the reported totals use,
  for every photo, the threshold chosen on the half it does not belong to.

Figures: ``positive_top1`` (best concept is right and accepted), ``positive_top1_any``
(best concept is right, before rejection), ``negative_reject``, ``weighted`` (their mean),
``seconds_per_photo`` (recognition only; mining time is reported apart).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from personalkv.config import MiningSettings
from personalkv.evaluation.dataset import Dataset
from personalkv.images import rgb_array
from personalkv.mining.miner import Miner, MinedConcept, build_library
from personalkv.mining.recognizer import ConceptRecognizer


@dataclass
class Scored:
    kind: str  # "pos" | "neg"
    concept: int  # true concept index (-1 for negatives)
    half: int  # 0 or 1
    best: int
    score: float
    path: str
    #: per concept (dataset order): keypoint scores (all / subject region), appearance scores
    detail: dict | None = None


def _build(ds: Dataset, settings: MiningSettings, pool: list[Path], log, cache: dict,
           adapter=None) -> tuple[ConceptRecognizer, dict]:
    photos = {c.concept_id: [rgb_array(p, settings.max_side) for p in c.train] for c in ds.concepts}
    extra = sorted(Path(settings.negative_pool).glob("*.jpg")) if settings.negative_pool else []
    pool = list(pool) + extra
    negatives = [rgb_array(p, settings.max_side) for p in pool]
    library = build_library(settings, photos, negatives,
                            {c.concept_id: [str(p) for p in c.train] for c in ds.concepts},
                            [str(p) for p in pool], cache, progress=log, adapter=adapter)
    miner = Miner(library, settings)
    mined: dict[str, MinedConcept] = {}
    for c in ds.concepts:
        mined[c.concept_id] = miner.mine(c.concept_id, photos[c.concept_id], c.info)
        log(f"mined {c.concept_id}: {len(mined[c.concept_id].patches)} patches")
    return ConceptRecognizer(library, mined, settings), {"photos": photos, "mined": mined}


def _metrics(rows: list[Scored], threshold: float) -> dict[str, float]:
    pos = [r for r in rows if r.kind == "pos"]
    neg = [r for r in rows if r.kind == "neg"]
    top1 = float(np.mean([r.best == r.concept and r.score >= threshold for r in pos])) if pos else float("nan")
    rej = float(np.mean([r.score < threshold for r in neg])) if neg else float("nan")
    parts = [v for v in (top1, rej) if not np.isnan(v)]
    return {"positive_top1": top1, "negative_reject": rej,
            "weighted": float(np.mean(parts)) if parts else float("nan"), "positives": len(pos), "negatives": len(neg)}


def choose_threshold(rows: list[Scored]) -> float:
    """Threshold that maximises the weighted score on ``rows`` (midpoint between scores)."""
    scores = np.unique([r.score for r in rows])
    if scores.size == 0:
        return 0.0
    cands = np.concatenate([[scores[0] - 1e-6], (scores[1:] + scores[:-1]) / 2, [scores[-1] + 1e-6]])
    best = max(cands, key=lambda t: (_metrics(rows, t)["weighted"], -abs(t)))
    return float(best)


def evaluate_recognition(ds: Dataset, settings: MiningSettings,
                         sheets_dir: Path | None = None, log: Callable[[str], None] = print,
                         cache: dict | None = None, adapter=None) -> dict:
    """``cache`` (optional, photo path -> described photo) lets repeated runs skip extraction.
    ``adapter``: a model adapter or a callable returning one, for the ``vlm`` embedder only."""
    negs = list(ds.negatives)
    folds = [negs[0::2], negs[1::2]] if negs else [[]]
    rows: list[Scored] = []
    seconds, n_photos, mine_s = 0.0, 0, 0.0
    cache = {} if cache is None else cache
    for f in range(len(folds)):
        t0 = time.perf_counter()
        rec, built = _build(ds, settings, folds[f], log, cache, adapter)
        mine_s += time.perf_counter() - t0
        if f == 0 and sheets_dir is not None:
            from personalkv.mining.sheets import write_sheet

            for c in ds.concepts:
                write_sheet(Path(sheets_dir) / f"{c.concept_id}.png", built["photos"][c.concept_id],
                            built["mined"][c.concept_id], title=c.concept_id)
        todo: list[tuple[str, int, int, Path]] = []
        if f == 0:
            todo += [("pos", ci, ci % 2, p) for ci, c in enumerate(ds.concepts) for p in c.test]
        other = 1 - f if len(folds) == 2 else None
        if other is not None:
            todo += [("neg", -1, (2 * i + other) % 2, p) for i, p in enumerate(folds[other])]
        for kind, ci, half, path in todo:
            image = rgb_array(path, settings.max_side)
            t = time.perf_counter()
            res = rec.recognize(image)
            seconds += time.perf_counter() - t
            n_photos += 1
            best = [c.concept_id for c in ds.concepts].index(res.best) if res.best else -1
            ids = [c.concept_id for c in ds.concepts]
            detail = {"kp_all": [res.keypoint_all[c] for c in ids], "kp_subject": [res.keypoint_subject[c] for c in ids],
                      "appearance": [res.appearance_scores[c] for c in ids],
                      "appearance_raw": [res.appearance_raw[c] for c in ids]}
            rows.append(Scored(kind, ci, half, best, res.scores.get(res.best, 0.0), str(path), detail))
        log(f"fold {f}: scored {len(todo)} photos")
    halves = {}
    cross_rows_thr = {}
    for h in (0, 1):
        tune = [r for r in rows if r.half == h]
        held = [r for r in rows if r.half != h]
        thr = choose_threshold(tune)
        halves[f"tuned_on_half{h}"] = {"threshold": thr, "tune": _metrics(tune, thr), "held_out": _metrics(held, thr)}
        cross_rows_thr[1 - h] = thr
    # total: each photo judged with the threshold chosen on the other half
    total_pos = [r for r in rows if r.kind == "pos"]
    total_neg = [r for r in rows if r.kind == "neg"]
    top1 = np.mean([r.best == r.concept and r.score >= cross_rows_thr[r.half] for r in total_pos]) if total_pos else float("nan")
    rej = np.mean([r.score < cross_rows_thr[r.half] for r in total_neg]) if total_neg else float("nan")
    parts = [float(v) for v in (top1, rej) if not np.isnan(v)]
    return {
        "dataset": str(ds.root),
        "concepts": len(ds.concepts),
        "positive_top1": float(top1),
        "positive_top1_any": float(np.mean([r.best == r.concept for r in total_pos])) if total_pos else float("nan"),
        "negative_reject": float(rej),
        "weighted": float(np.mean(parts)) if parts else float("nan"),
        "seconds_per_photo": seconds / max(n_photos, 1),
        "mining_seconds": mine_s,
        "at_default_threshold": _metrics(rows, settings.threshold) | {"threshold": settings.threshold},
        "halves": halves,
        "settings": settings.model_dump(),
        "rows": [r.__dict__ for r in rows],
    }
