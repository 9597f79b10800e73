"""Image-only retrieval benchmark: which concept does a question photo show?

For each registered image encoder (default: ``global`` and ``efficientnet-lite0``), on a dataset
in the shared format (``concepts/<id>/train|test/*.jpg``, ``negatives/*.jpg``):

* keys of a concept: the embeddings of its train photos (whole), and - unless ``--no-windows`` -
  of their ``personalkv.mining.proposals.propose_boxes`` windows (fractions 0.3/0.45/0.65, the
  EfficientNet miner's; the retriever's real keys are the mined subset of such windows plus the
  whole photos);
* a query: a test photo cut by the retriever's own ``query_crops``; a concept's score is the
  best cosine of any query crop with any of its keys (what ``Retriever._image_scores`` does);
* top-1 / top-3: share of test photos whose own concept ranks first / in the first three, with
  "photos" keys only and with "photos+windows" keys;
* calibration: the same best-of score for unrelated pairs (test photos vs other concepts, and
  negatives vs every concept: p50/p90/p95) and for matches (test photo vs its own concept:
  p25/p50), i.e. the numbers behind ``score_floor`` / ``score_match``.

Usage: ``python -m benchmarks.image_retrieval /work/shared/data/myvlm [--out results.json]``.
The JSON holds numbers and concept ids only (no photo paths). ~15 min on 2 busy CPU cores for
myvlm (most of it EfficientNet over ~20k crops); ``--max-negatives`` trims it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from personalkv.images import decode
from personalkv.mining.proposals import propose_boxes
from personalkv.retrieval.encoders import get_image_encoder
from personalkv.retrieval.retriever import query_crops

NAME = "image_retrieval"
WINDOW_FRACTIONS = (0.3, 0.45, 0.65)
_EXT = (".jpg", ".jpeg", ".png")


def _photos(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*") if p.suffix.lower() in _EXT) if folder.is_dir() else []


def _load(path: Path) -> Image.Image:
    return decode(path)  # EXIF orientation applied, as on every service path


def load_dataset(root: Path, max_negatives: int | None):
    train, test = {}, {}
    for cdir in sorted((root / "concepts").iterdir()):
        if not cdir.is_dir():
            continue
        train[cdir.name] = [_load(p) for p in _photos(cdir / "train")]
        test[cdir.name] = [_load(p) for p in _photos(cdir / "test")]
    negatives = [_load(p) for p in _photos(root / "negatives")][:max_negatives]
    return train, test, negatives


def _windows(image: Image.Image) -> list[Image.Image]:
    boxes = propose_boxes((image.height, image.width), WINDOW_FRACTIONS)
    return [image.crop(tuple(int(round(v)) for v in b)) for b in boxes]


def _pct(x, q) -> float:
    return round(float(np.percentile(x, q)), 4) if len(x) else float("nan")


def run_encoder(name: str, train, test, negatives, windows: bool) -> dict:
    enc = get_image_encoder(name)
    crops = 0
    t0 = time.perf_counter()
    keys = {}  # concept -> {"photos": (n, d), "all": (m, d)}
    for cid, photos in train.items():
        ph = enc.encode(photos)
        wins = [w for p in photos for w in _windows(p)] if windows else []
        allk = np.concatenate([ph, enc.encode(wins)]) if wins else ph
        keys[cid] = {"photos": ph, "all": allk}
        crops += len(photos) + len(wins)
    concepts = sorted(keys)

    def scores(image):  # key set -> (n_concepts,) best cosine
        nonlocal crops
        qc = query_crops(image)
        crops += len(qc)
        q = enc.encode(qc)
        return {ks: np.array([float((q @ keys[c][ks].T).max()) for c in concepts])
                for ks in ("photos", "all")}

    test_scores = [(cid, scores(im)) for cid in concepts for im in test.get(cid, [])]
    neg_scores = [scores(im) for im in negatives]
    seconds = time.perf_counter() - t0

    out = {"encoder": enc.name, "registry_name": name, "dim": enc.dim,
           "score_floor": enc.score_floor, "score_match": enc.score_match,
           "ms_per_crop": round(1000 * seconds / max(crops, 1), 2), "crops": crops,
           "key_sets": {}}
    for ks in ("photos", "all") if windows else ("photos",):
        ranks, match, unrelated, per_concept = [], [], [], {}
        for cid, s in test_scores:
            own = concepts.index(cid)
            rank = int((s[ks] > s[ks][own]).sum())  # 0 = first
            ranks.append(rank)
            per_concept.setdefault(cid, []).append(rank == 0)
            match.append(s[ks][own])
            unrelated.extend(np.delete(s[ks], own))
        neg = [v for s in neg_scores for v in s[ks]]
        neg_best = [float(s[ks].max()) for s in neg_scores]
        ranks = np.array(ranks)
        label = "photos" if ks == "photos" else "photos+windows"
        out["key_sets"][label] = {
            "keys": int(sum(len(keys[c][ks]) for c in concepts)),
            "queries": len(ranks),
            "top1": round(float((ranks == 0).mean()), 4),
            "top3": round(float((ranks < 3).mean()), 4),
            "per_concept_top1": {c: round(float(np.mean(v)), 3) for c, v in per_concept.items()},
            "match": {"p25": _pct(match, 25), "p50": _pct(match, 50)},
            "unrelated_test_vs_other_concepts": {"p50": _pct(unrelated, 50), "p90": _pct(unrelated, 90)},
            "unrelated_negatives": {"p50": _pct(neg, 50), "p90": _pct(neg, 90)},
            "unrelated_all": {q: _pct(unrelated + neg, int(q[1:])) for q in ("p50", "p90", "p95")},
            # share of negatives whose best concept stays under the encoder's floor (rejected)
            "negatives_under_floor": round(float(np.mean(np.array(neg_best) < enc.score_floor)), 4)
            if neg_best else None,
            "test_over_match": round(float(np.mean(np.array(match) >= enc.score_match)), 4),
        }
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dataset", type=Path)
    ap.add_argument("--encoders", default="global,efficientnet-lite0")
    ap.add_argument("--out", type=Path, default=None, help="JSON file to write (numbers only)")
    ap.add_argument("--no-windows", action="store_true", help="keys = whole train photos only")
    ap.add_argument("--max-negatives", type=int, default=None)
    args = ap.parse_args(argv)

    train, test, negatives = load_dataset(args.dataset, args.max_negatives)
    result = {"benchmark": NAME, "dataset": args.dataset.name, "concepts": len(train),
              "train_photos": sum(map(len, train.values())),
              "test_photos": sum(map(len, test.values())), "negatives": len(negatives),
              "window_fractions": list(WINDOW_FRACTIONS), "encoders": []}
    for name in args.encoders.split(","):
        result["encoders"].append(run_encoder(name.strip(), train, test, negatives,
                                              not args.no_windows))
        if args.out:  # partial results survive a later failure
            args.out.write_text(json.dumps(result, indent=1) + "\n")

    print(f"{result['dataset']}: {result['concepts']} concepts, {result['test_photos']} test "
          f"photos, {result['negatives']} negatives")
    print(f"{'encoder':<22}{'keys':<16}{'top1':>6}{'top3':>6}{'match p50':>11}"
          f"{'unrel p90':>11}{'neg<floor':>10}{'ms/crop':>9}")
    for e in result["encoders"]:
        for label, k in e["key_sets"].items():
            print(f"{e['encoder']:<22}{label:<16}{k['top1']:>6.3f}{k['top3']:>6.3f}"
                  f"{k['match']['p50']:>11.3f}{k['unrelated_all']['p90']:>11.3f}"
                  f"{k['negatives_under_floor'] or 0:>10.3f}{e['ms_per_crop']:>9.1f}")
    return result


if __name__ == "__main__":
    main()
