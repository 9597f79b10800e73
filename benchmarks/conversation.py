"""Conversation benchmark: what a follow-up costs with its KV kept, rebuilt from its record,
or asked as one long single-turn question.

One user with 3 concepts (text facts in the profile, plus one small drawn photo each since
``add_photos`` needs one), embedded, SmolLM2-135M (``smollm2``, real weights, offline). A
conversation of TURNS questions (~15-30 words; max_new_tokens=32, greedy, top_k=3); turn 1
names all 3 concepts, so their chunks are placed once, in turn 1. Through the service layer:

* ``kept``: turns 1..TURNS with the conversation's KV kept live (``svc.conversations``);
* ``rebuild``: a second, identical conversation whose turn k (k >= 2) is asked right after
  ``svc.conversations.drop(user)``, so its KV is replayed from the stored record first;
* ``single``: a plain Ask (no conversation) whose question is the previous turns' questions
  and the kept conversation's answers as text, then the new question: it places the evidence
  again and prefills the history as text (``service.max_question_chars`` raised for it;
  max_new_tokens=1 there, as only its TTFT is timed).

TTFT as the service sees it = retrieve + load + place + recompute + prefill + rebuild.
Figures: per-turn TTFT lists (``ttft_kept_s``, ``ttft_rebuild_s``, ``ttft_single_s``),
``bytes_per_conversation_turnN`` (live KV after the last turn), ``ttft_ratio_rebuild_over_kept_turnN``
(target >= 6.7), ``ttft_kept_turnN_over_turn1`` (target <= 1.5) and
``ttft_ratio_single_over_kept_turnN``; N = TURNS (8 by default).

PERSONALKV_BENCH_CONVERSATION_TURNS (8). ~1-2 min on 2 busy cores.
"""

from __future__ import annotations

import tempfile

import numpy as np

NAME = "conversation"
USER = "bench"

CONCEPTS = [
    ("biscuit", "Biscuit", "dog",
     "Biscuit is my golden retriever, seven years old. She was adopted from a shelter in Lyon, "
     "eats salmon kibble twice a day, is afraid of thunder and loves swimming in the lake."),
    ("marlowe", "Marlowe", "bicycle",
     "Marlowe is my dark green steel touring bicycle, built in 1998. It has a Brooks leather "
     "saddle, a front rack for panniers, and its rear tyre was replaced last March."),
    ("juniper", "Juniper", "plant",
     "Juniper is the fiddle-leaf fig in my living room, bought in 2021. It wants bright "
     "indirect light, water every ten days, and it lost three leaves after the move."),
]

QUESTIONS = [
    "Can you remind me what you know about Biscuit, Marlowe and Juniper, and which of the "
    "three needs the most care from me each week?",
    "How old is Biscuit now, and is there anything about her diet that I should keep in mind "
    "when I buy food for the coming month?",
    "When I take Marlowe out for a long weekend trip, what should I check on the bicycle "
    "before leaving, given what you know about it?",
    "My living room gets darker in winter; what does that mean for Juniper, and how often "
    "should I be watering it during those months?",
    "There is a storm forecast for tonight with a lot of thunder; how can I help Biscuit stay "
    "calm while it passes over the house?",
    "I am planning to sell some old things; roughly how many years have I had Marlowe, and "
    "which parts of it were replaced most recently?",
    "If I go away for two weeks, which of my three things needs someone to look after it, and "
    "what should I tell that person to do?",
    "Before we finish, can you summarise in one sentence each what makes Biscuit, Marlowe and "
    "Juniper special to me?",
]


def _log(msg: str) -> None:
    print(f"[{NAME}] {msg}", flush=True)


def _ttft(result) -> float:
    t = result.timings
    return t.retrieve + t.load + t.place + t.recompute + t.prefill + t.rebuild


def ingest_concepts(svc, user: str = USER) -> None:
    """The user's 3 concepts (``CONCEPTS``: text facts and one drawn photo each), through the
    use cases; every one READY (also the serving benchmark's library)."""
    from benchmarks.ingest import _marks, _photo
    from personalkv.service_layer import concepts

    rng = np.random.default_rng(0)
    marks = _marks(len(CONCEPTS), rng)
    for i, (cid, name, category, info) in enumerate(CONCEPTS):
        concepts.create_concept(svc, user, cid, name, category, info)
        concepts.add_photos(svc, user, cid, [_photo(rng, marks[i])])
        m = concepts.get_concept(svc, user, cid)
        assert m.state == "ready", (m.state, m.failure_reason)


def run() -> dict:
    from personalkv.bootstrap import bootstrap
    from personalkv.config import get_settings
    from personalkv.models import load_adapter
    from personalkv.service_layer import answering
    from personalkv.service_layer.answering import AskOptions

    settings = get_settings()
    turns = settings.bench.conversation_turns
    questions = QUESTIONS[:turns]
    work = tempfile.mkdtemp(prefix="pkv-bench-conversation-")
    settings = settings.model_copy(update={
        "service": settings.service.model_copy(update={"data_dir": work, "max_question_chars": 20_000}),
        "model": settings.model.model_copy(update={"name": "smollm2"})})
    svc = bootstrap(settings.embedded(task_queue="inline"), adapter=load_adapter("smollm2", settings=settings.model))
    options = AskOptions(top_k=3, max_new_tokens=32, temperature=0.0)
    # the single-turn baseline's TTFT does not depend on how long it goes on: one token is enough
    first_token = AskOptions(top_k=3, max_new_tokens=1, temperature=0.0)
    try:
        ingest_concepts(svc)
        _log("3 concepts ready")
        # warm-up (first forward passes, encoders), outside the timings
        answering.ask(svc, USER, "What do you know about Biscuit?", [], AskOptions(top_k=3, max_new_tokens=2))

        # 1. kept
        kept, answers, placed, turn1_concepts = [], [], [], set()
        cid = None
        for k, q in enumerate(questions):
            r = answering.ask(svc, USER, q, [], options, start_conversation=(k == 0), conversation_id=cid)
            cid = cid or r.conversation_id
            assert r.timings.rebuild < 0.01, (k, r.timings)  # opening the state only
            kept.append(_ttft(r))
            answers.append(r.answer)
            placed.append(sum(not c.from_earlier_turn for c in r.chunks))
            if k == 0:
                turn1_concepts = {c.concept_id for c in r.chunks}
            _log(f"kept turn {k + 1}: ttft {kept[-1] * 1000:.0f} ms, {placed[-1]} chunks placed")
        assert len(turn1_concepts) == 3 and placed[0] == 3, (placed[0], turn1_concepts)
        live = svc.conversations.stats()
        kept_bytes = live.bytes

        # 2. rebuild: an identical conversation, KV dropped before every follow-up
        rebuild, rebuild_s, same = [], [], True
        cid2 = None
        for k, q in enumerate(questions):
            if k:
                svc.conversations.drop(USER)
            r = answering.ask(svc, USER, q, [], options, start_conversation=(k == 0), conversation_id=cid2)
            cid2 = cid2 or r.conversation_id
            if k:
                assert r.timings.rebuild > 0.0
            rebuild.append(_ttft(r))
            rebuild_s.append(r.timings.rebuild)
            same &= r.answer == answers[k]
            _log(f"rebuild turn {k + 1}: ttft {rebuild[-1] * 1000:.0f} ms (rebuild {r.timings.rebuild * 1000:.0f} ms)")

        # 3. single-turn: history as text + the new question
        single, single_chunks = [], []
        for k, q in enumerate(questions):
            history = "".join(f"Earlier I asked: {pq}\nYou answered: {pa.strip()}\n"
                              for pq, pa in zip(questions[:k], answers[:k]))
            r = answering.ask(svc, USER, history + ("Now: " if k else "") + q, [], first_token)
            single.append(_ttft(r))
            single_chunks.append(len(r.chunks))
            _log(f"single turn {k + 1}: ttft {single[-1] * 1000:.0f} ms, {len(r.chunks)} chunks placed")

        n = turns
        return {
            "model": "smollm2", "turns": n, "concepts": len(CONCEPTS), "max_new_tokens": 32,
            "chunks_placed_turn1": placed[0],
            "ttft_kept_turn1_s": round(kept[0], 4),
            f"ttft_kept_turn{n}_s": round(kept[-1], 4),
            f"ttft_rebuild_turn{n}_s": round(rebuild[-1], 4),
            f"ttft_single_turn{n}_s": round(single[-1], 4),
            f"bytes_per_conversation_turn{n}": int(kept_bytes),
            f"ttft_ratio_rebuild_over_kept_turn{n}": round(rebuild[-1] / kept[-1], 3),
            f"ttft_kept_turn{n}_over_turn1": round(kept[-1] / kept[0], 3),
            f"ttft_ratio_single_over_kept_turn{n}": round(single[-1] / kept[-1], 3),
            "target_rebuild_over_kept_min": 6.7, "target_kept_last_over_first_max": 1.5,
            "rebuild_answers_equal_kept": same,
            "ttft_kept_s": [round(v, 4) for v in kept],
            "ttft_rebuild_s": [round(v, 4) for v in rebuild],
            "rebuild_seconds": [round(v, 4) for v in rebuild_s],
            "ttft_single_s": [round(v, 4) for v in single],
            "chunks_placed_kept": placed,
            "chunks_placed_single": single_chunks,
        }
    finally:
        svc.close()
        import shutil

        shutil.rmtree(work, ignore_errors=True)
