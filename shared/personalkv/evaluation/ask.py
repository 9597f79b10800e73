"""`personalkv eval ask DATASET`: recognition as a user meets it, through Ask.

Everything goes through the use cases the gRPC servers call, embedded, at the configured
settings (the shipped defaults unless the environment says otherwise; nothing is chosen on the
evaluation data):

1. ingest: one user creates every concept (``concepts.create_concept``) and uploads its
   ``train`` photos (``concepts.add_photos``; mining and caching run in-process, as the
   workers would);
2. queries, each one Ask's retrieve step (``answering.retrieve``: the same checks, photo
   decoding and retriever as ``Ask``):
   * every ``test`` photo with a question that does not name the concept ("What is this?"):
     ``positive_top1`` (the right concept is returned first), ``positive_top1_any`` (it is
     the best-scored candidate, returned or not), ``positive_extra`` (another concept was
     returned with it: wrong evidence placed);
   * every negative photo: ``negative_reject`` (nothing is returned);
   * a question naming each concept, no photo: ``named_top1``;
   * two-concept queries: two concepts' test photos side by side ("What are these?") and a
     question naming two concepts; ``two_concept_recall`` is the share of those concepts
     returned (``two_concept_both``: queries with both returned);
   * three concepts' test photos side by side: ``three_concept_recall_photo`` (all three
     returned).
   ``weighted`` = mean(positive_top1, negative_reject); ``seconds_per_query`` is the retrieve
   time of the photo queries (p50, p95), after the user's recognizer was built once
   (``recognizer_build_seconds``); ``ingest_seconds_per_photo`` is create + upload + mining +
   caching per train photo.

``half`` keeps every other concept and negative (0: even indices, 1: odd): choose a setting
on one half, report the other.
"""

from __future__ import annotations

import io
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from personalkv.config import Settings
from personalkv.evaluation.dataset import Dataset, DatasetConcept
from personalkv.images import decode

USER = "eval"
PHOTO_QUESTION = "What is this?"
PAIR_PHOTO_QUESTION = "What are these two?"
TRIPLE_PHOTO_QUESTION = "What are these three?"


def named_question(name: str) -> str:
    return f"Where did I last see {name}?"


def pair_question(a: str, b: str) -> str:
    return f"Do {a} and {b} go well together?"


@dataclass
class Query:
    kind: str  # positive | negative | named | pair_photo | pair_text | triple_photo
    want: tuple[str, ...]  # concepts that must be returned (first, for single ones)
    question: str
    photo: bytes | None = None
    label: str = ""  # file name(s), for the misses sheet
    returned: list[tuple[str, float]] = field(default_factory=list)
    candidates: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def hit(self) -> bool:
        got = [c for c, _ in self.returned]
        if self.kind == "negative":
            return not got
        if self.kind in ("positive", "named"):
            return bool(got) and got[0] == self.want[0]
        return set(self.want) <= set(got)


def ingest_concept(svc, user_id: str, concept: DatasetConcept) -> float:
    """Create the concept and upload its train photos through the use cases; seconds taken.
    Raises RuntimeError when it does not end ``ready``."""
    from personalkv.service_layer import concepts

    t0 = time.perf_counter()
    concepts.create_concept(svc, user_id, concept.concept_id, concept.name, concept.category,
                            concept.info)
    concepts.add_photos(svc, user_id, concept.concept_id, [p.read_bytes() for p in concept.train])
    m = concepts.get_concept(svc, user_id, concept.concept_id)
    if m.state != "ready":
        raise RuntimeError(f"{concept.concept_id} ended {m.state}: {m.failure_reason}")
    return time.perf_counter() - t0


def side_by_side(*paths: Path, height: int = 480) -> bytes:
    """Photos at one height, left to right, as PNG bytes (a two- or three-concept question photo)."""
    ims = [decode(p) for p in paths]
    ims = [im.resize((max(1, round(im.width * height / im.height)), height)) for im in ims]
    out = Image.new("RGB", (sum(im.width for im in ims), height))
    x = 0
    for im in ims:
        out.paste(im, (x, 0))
        x += im.width
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()


def _subset(ds: Dataset, half: int | None) -> Dataset:
    if half is None:
        return ds
    return Dataset(ds.root, ds.concepts[half::2], ds.negatives[half::2], ds.questions)


def build_queries(ds: Dataset) -> list[Query]:
    queries = []
    for c in ds.concepts:
        queries += [Query("positive", (c.concept_id,), PHOTO_QUESTION, p.read_bytes(), p.name)
                    for p in c.test]
    queries += [Query("negative", (), PHOTO_QUESTION, p.read_bytes(), p.name) for p in ds.negatives]
    queries += [Query("named", (c.concept_id,), named_question(c.name), label=c.name)
                for c in ds.concepts]
    n = len(ds.concepts)
    for i in range(n if n > 2 else n - 1):
        a, b = ds.concepts[i], ds.concepts[(i + 1) % n]
        queries.append(Query("pair_text", (a.concept_id, b.concept_id), pair_question(a.name, b.name),
                             label=f"{a.name} + {b.name}"))
        if a.test and b.test:
            pa, pb = a.test[0], b.test[-1]
            queries.append(Query("pair_photo", (a.concept_id, b.concept_id), PAIR_PHOTO_QUESTION,
                                 side_by_side(pa, pb), f"{pa.name} + {pb.name}"))
    for i in range(n if n > 3 else n - 2):  # cyclic triples, each photo not used in its pairs
        three = [ds.concepts[(i + j) % n] for j in range(3)]
        if all(c.test for c in three):
            shots = [c.test[len(c.test) // 2] for c in three]
            queries.append(Query("triple_photo", tuple(c.concept_id for c in three), TRIPLE_PHOTO_QUESTION,
                                 side_by_side(*shots), " + ".join(p.name for p in shots)))
    return queries


def _rate(queries: Sequence[Query], kind: str) -> float:
    hits = [q.hit for q in queries if q.kind == kind]
    return float(np.mean(hits)) if hits else float("nan")


def summarize(queries: Sequence[Query], ingest_seconds: float, photos: int) -> dict:
    pos = [q for q in queries if q.kind == "positive"]
    pairs = [q for q in queries if q.kind.startswith("pair")]
    top1_any = [bool(q.candidates) and q.candidates[0]["concept"] == q.want[0] for q in pos]
    wanted = sum(len(q.want) for q in pairs)
    found = sum(len(set(q.want) & {c for c, _ in q.returned}) for q in pairs)
    photo_s = [q.seconds for q in queries if q.photo is not None]
    text_s = [q.seconds for q in queries if q.photo is None]
    r = {
        "positive_top1": _rate(queries, "positive"),
        "positive_top1_any": float(np.mean(top1_any)) if top1_any else float("nan"),
        # single-concept photos that also returned another concept (wrong evidence placed)
        "positive_extra": float(np.mean([len({c for c, _ in q.returned} - set(q.want)) > 0 for q in pos]))
        if pos else float("nan"),
        "negative_reject": _rate(queries, "negative"),
        "named_top1": _rate(queries, "named"),
        "two_concept_recall": found / wanted if wanted else float("nan"),
        "two_concept_both": float(np.mean([q.hit for q in pairs])) if pairs else float("nan"),
        "two_concept_recall_photo": _rate(queries, "pair_photo"),
        "two_concept_recall_text": _rate(queries, "pair_text"),
        "three_concept_recall_photo": _rate(queries, "triple_photo"),
        "seconds_per_query": {"p50": float(np.percentile(photo_s, 50)) if photo_s else float("nan"),
                              "p95": float(np.percentile(photo_s, 95)) if photo_s else float("nan")},
        "seconds_per_text_query": {"p50": float(np.percentile(text_s, 50)) if text_s else float("nan"),
                                   "p95": float(np.percentile(text_s, 95)) if text_s else float("nan")},
        "ingest_seconds_per_photo": ingest_seconds / photos if photos else float("nan"),
        "counts": {k: sum(q.kind == k for q in queries)
                   for k in ("positive", "negative", "named", "pair_photo", "pair_text", "triple_photo")},
    }
    parts = [v for v in (r["positive_top1"], r["negative_reject"]) if not np.isnan(v)]
    r["weighted"] = float(np.mean(parts)) if parts else float("nan")
    return r


def evaluate_ask(ds: Dataset, settings: Settings, *, half: int | None = None,
                 work_dir: Path | None = None, sheet: Path | None = None,
                 log: Callable[[str], None] = print, adapter=None, reuse: bool = False) -> dict:
    """See the module doc. ``work_dir``: where the embedded store and index live (a temporary
    folder, removed afterwards, when None). ``adapter``: the model (default: the configured).
    ``reuse``: concepts already ready in ``work_dir`` (an earlier run) are not ingested again,
    so retrieval settings can be re-measured without re-mining (ingest time is then not
    measured for them)."""
    from personalkv.service_layer import answering
    from personalkv.bootstrap import bootstrap

    ds = _subset(ds, half)
    temp = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="pkv-eval-ask-")) if temp else Path(work_dir)
    settings = settings.model_copy(update={"service": settings.service.model_copy(
        update={"data_dir": str(work)})})
    svc = bootstrap(settings.embedded(task_queue="inline"), adapter=adapter)
    try:
        ingest_s, photos = 0.0, 0
        reused = 0
        for i, c in enumerate(ds.concepts):
            if reuse and svc.store.read_manifest(USER, c.concept_id) is not None:
                reused += 1
                continue
            seconds = ingest_concept(svc, USER, c)
            ingest_s += seconds
            photos += len(c.train)
            log(f"ingested {c.concept_id} ({i + 1}/{len(ds.concepts)}): {len(c.train)} photos in "
                f"{seconds:.1f} s ({ingest_s / max(photos, 1):.2f} s/photo so far)")
        t0 = time.perf_counter()
        if settings.retrieval.photo_reranker == "recognizer":
            svc.recognizers.state(USER)  # built once per process; queries then run warm
        build_s = time.perf_counter() - t0
        queries = build_queries(ds)
        log(f"recognizer built in {build_s:.1f} s; {len(queries)} queries")
        for k, q in enumerate(queries):
            t = time.perf_counter()
            result = answering.retrieve(svc, USER, q.question, [q.photo] if q.photo else [])
            q.seconds = time.perf_counter() - t
            q.returned = [(c.concept_id, c.score) for c in result.concepts]
            q.candidates = [{"concept": c.concept_id, "score": c.score, "text": c.text_score,
                             "image": c.image_score, "named": c.named} for c in result.candidates[:8]]
            if (k + 1) % 25 == 0:
                log(f"queried {k + 1}/{len(queries)}")
        out = {"dataset": str(ds.root), "half": half, "concepts": len(ds.concepts),
               **summarize(queries, ingest_s, photos), "recognizer_build_seconds": build_s,
               "concepts_reused": reused,
               # the recognizer's stages (Recognition.seconds), mean per photo query
               "recognizer_stage_seconds": {k: v / max(svc.recognizers.recognitions, 1)
                                            for k, v in svc.recognizers.stage_seconds.items()}
               if settings.retrieval.photo_reranker == "recognizer" else {},
               "recognizer_views_per_photo": svc.recognizers.views / max(svc.recognizers.recognitions, 1),
               "settings": {"retrieval": settings.retrieval.model_dump(),
                            "mining": settings.mining.model_dump(), "model": settings.model.name},
               "rows": [{"kind": q.kind, "want": q.want, "label": q.label, "question": q.question,
                         "hit": q.hit, "returned": q.returned, "candidates": q.candidates,
                         "seconds": q.seconds} for q in queries]}
        if sheet is not None:
            out["misses_sheet"] = str(write_misses_sheet(sheet, queries))
        return out
    finally:
        svc.close()
        if temp:
            shutil.rmtree(work, ignore_errors=True)


def write_misses_sheet(path: Path, queries: Sequence[Query], thumb: int = 200, per_row: int = 6) -> Path:
    """A PNG grid of the photo queries that missed, each captioned with what was wanted and
    what came back (text-only misses are listed as captions without a picture)."""
    misses = [q for q in queries if not q.hit]
    cells = []
    for q in misses:
        cell = Image.new("RGB", (thumb, thumb + 44), (255, 255, 255))
        if q.photo is not None:
            im = decode(q.photo)
            im.thumbnail((thumb, thumb))
            cell.paste(im, ((thumb - im.width) // 2, (thumb - im.height) // 2))
        draw = ImageDraw.Draw(cell)
        got = ", ".join(f"{c} {s:.2f}" for c, s in q.returned[:2]) or "none"
        best = q.candidates[0] if q.candidates else None
        draw.text((3, thumb + 1), f"{q.kind}: want {'+'.join(q.want) or 'none'}"[:40], fill=(200, 0, 0))
        draw.text((3, thumb + 15), f"got {got}"[:40], fill=(0, 0, 0))
        draw.text((3, thumb + 29), (f"best {best['concept']} {best['score']:.2f}" if best else "")[:40],
                  fill=(90, 90, 90))
        cells.append(cell)
    rows = max(1, -(-len(cells) // per_row))
    sheet = Image.new("RGB", (per_row * thumb, rows * (thumb + 44)), (235, 235, 235))
    for i, cell in enumerate(cells):
        sheet.paste(cell, ((i % per_row) * thumb, (i // per_row) * (thumb + 44)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
