"""The Ask use case: retrieve the user's concepts, load their KV chunks, answer.

Called by the answering gRPC servicer (``ask`` for unary, ``ask_stream`` for server
streaming), the CLI (``personalkv ask``) and the demo. Steps and their timings:

  retrieve  Retriever over the key index (question text, and the photo if any)
  load      chunk blobs -> KVChunk through the hot-chunk LRU (``svc.chunk_cache``)
  place     rotate and lay the chunks behind the system prefix (+ selective recompute)
  prefill   the question (and its photo) after the placed chunks
  decode    token by token (batched with other Asks' tokens: ``engine.scheduler``)
  rebuild   (a follow-up whose conversation KV this process does not hold) replaying its record
  queue     waiting for the model (the batched scheduler's queue)

A chunk that vanished (concept deleted meanwhile) or is unreadable is skipped and counted in
``AskResult.skipped_chunks``; the answer then rests on the remaining evidence.

With ``start_conversation`` / ``conversation_id`` the Ask is a turn of a conversation whose KV
is kept between turns (``service_layer.conversations``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, fields
from typing import NamedTuple

from personalkv.cancellation import stop_when
from personalkv.conversation_record import PlacedEvidence
from personalkv.engine.detokenizer import IncrementalDetokenizer
from personalkv.images import ValidatedPhoto
from personalkv.kv.conversation import ConversationKV
from personalkv.kv.generation import GenerationOptions
from personalkv.service_layer import conversations
from personalkv.service_layer._common import check_ids, dependencies
from personalkv.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted
from personalkv.service_layer.evidence import answerable, load_chunks
from personalkv.service_layer.photos import validate_photo
from personalkv.engine.scheduler import ModelJob
from personalkv.service_layer.services import Services

log = logging.getLogger(__name__)


@dataclass
class AskOptions:
    """``None`` fields take the configured defaults (retrieval.top_k, model.recompute_ratio)."""

    top_k: int | None = None
    recompute_ratio: float | None = None
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class CallLimits:
    """What the caller's call allows: ``deadline`` (``time.monotonic()``; None: none) after
    which nobody waits, and ``cancelled()``, true once the caller is gone. The model scheduler
    refuses queued work past either (``engine.scheduler``)."""

    deadline: float | None = None
    cancelled: Callable[[], bool] = lambda: False

    def stop_reason(self) -> str | None:
        """Why work on this call should stop now (None: it goes on)."""
        if self.cancelled():
            return "the caller went away"
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return "the call's deadline passed"
        return None


class UsedConcept(NamedTuple):
    """A concept the answer rests on, with its retrieval score."""

    concept_id: str
    score: float


class UsedChunk(NamedTuple):
    """A KV chunk placed in front of the question."""

    chunk_id: str
    concept_id: str
    kind: str  # "profile_text" | "image_patch"
    score: float  # its concept's retrieval score
    #: placed by an earlier turn of the conversation (in its KV), not for this question
    from_earlier_turn: bool = False


@dataclass(frozen=True)
class Timings:
    """Seconds spent in each stage of one Ask (see the module docstring)."""

    retrieve: float = 0.0
    load: float = 0.0
    place: float = 0.0
    recompute: float = 0.0
    prefill: float = 0.0
    decode: float = 0.0
    #: a conversation's KV rebuilt from its record (0: kept in this process, or no conversation)
    rebuild: float = 0.0
    #: waiting in the answering process's queue for the model (the batched scheduler)
    queue: float = 0.0

    @property
    def total(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self))


@dataclass
class AskResult:
    answer: str
    concepts: list[UsedConcept]  # best first
    chunks: list[UsedChunk]  # in placement order
    timings: Timings
    personal_evidence_used: bool
    token_ids: list[int] = field(default_factory=list)
    skipped_chunks: int = 0
    cache_hits: int = 0
    #: prompt tokens whose KV was not computed for this Ask: placed chunk tokens, and the kept
    #: conversation KV a follow-up continued from
    reused_tokens: int = 0
    #: the conversation this turn belongs to (None: a single-turn Ask, nothing kept)
    conversation_id: str | None = None

    def describe_evidence(self) -> str:
        """What the answer rested on, for a terminal (``personalkv ask``, the demo)."""
        concepts = ", ".join(f"{c} ({s:.2f})" for c, s in self.concepts) or "none of yours"
        timings = " ".join(f"{f.name}={getattr(self.timings, f.name) * 1000:.0f}ms"
                           for f in fields(self.timings))
        placed = sum(not c.from_earlier_turn for c in self.chunks)
        earlier = len(self.chunks) - placed
        return (f"  concepts: {concepts}\n  chunks placed: {placed} "
                f"(cache hits {self.cache_hits}, skipped {self.skipped_chunks})"
                + (f", {earlier} from earlier turns" if earlier else "") + "\n"
                f"  timings: {timings}")


@dataclass(frozen=True)
class _Checked:
    """An Ask that passed ``_check``: the stripped question and its validated photo (decoded
    once, here; every later step takes ``photo.image``)."""

    question: str
    photo: ValidatedPhoto | None


def _check(svc: Services, user_id: str, question: str, photos: Sequence[bytes],
           options: AskOptions) -> _Checked:
    check_ids(user_id)
    limits = svc.settings.service
    if not isinstance(question, str) or not question.strip():
        raise InvalidArgument("the question is empty")
    if len(question) > limits.max_question_chars:
        raise InvalidArgument(f"the question is {len(question)} characters; the limit is "
                              f"{limits.max_question_chars}")
    if len(photos) > limits.max_ask_photos:
        raise InvalidArgument(f"{len(photos)} photos given; an Ask takes at most {limits.max_ask_photos}")
    if options.top_k is not None and not 1 <= options.top_k <= 20:
        raise InvalidArgument("top_k must be between 1 and 20")
    if options.recompute_ratio is not None and not 0.0 <= options.recompute_ratio <= 1.0:
        raise InvalidArgument("recompute_ratio must be between 0 and 1")
    if not 1 <= options.max_new_tokens <= limits.max_new_tokens:
        raise InvalidArgument(f"max_new_tokens must be between 1 and {limits.max_new_tokens}")
    if not 0.0 <= options.temperature <= 5.0:
        raise InvalidArgument("temperature must be between 0 and 5")
    if not 0.0 < options.top_p <= 1.0:
        raise InvalidArgument("top_p must be in (0, 1]")
    validated = []
    for data in photos:
        try:
            validated.append(validate_photo(data, max_bytes=limits.max_photo_bytes,
                                            max_pixels=limits.max_photo_pixels))
        except (InvalidArgument, ResourceExhausted) as exc:
            raise type(exc)(f"question photo: {exc.message}") from None
    return _Checked(question.strip(), validated[0] if validated else None)


def _retrieve(svc: Services, user_id: str, checked: _Checked, top_k: int | None, fingerprint: str,
              call: CallLimits = CallLimits()):
    image = checked.photo.image if checked.photo is not None else None
    with _photo_slot(svc, user_id, image is not None, call), dependencies("the retrieval index"), \
            stop_when(call.stop_reason):  # recognition stops between views for nobody
        return svc.retriever.retrieve(user_id, checked.question, image, top_k,
                                      model_fingerprint=fingerprint)


@contextmanager
def _photo_slot(svc: Services, user_id: str, needed: bool, call: CallLimits) -> Iterator[None]:
    """One of ``service.photo_recognitions`` slots for a photo's recognition (text questions
    take none): photo Asks queue for the CPU among themselves instead of starving text Asks,
    and one user never holds them all (``photo_slots.FairSlots``)."""
    if not needed:
        yield
        return
    slots = svc.photo_slots
    timeout = None if call.deadline is None else max(0.0, call.deadline - time.monotonic())
    if not slots.acquire(user_id, timeout=timeout):
        raise DeadlineExceeded("the photo waited past the call's deadline for recognition; retry later")
    try:
        yield
    finally:
        slots.release(user_id)


def retrieve(svc: Services, user_id: str, question: str, photos: Sequence[bytes] = (),
             top_k: int | None = None):
    """Ask's retrieve step alone (same checks, photo decoding and retriever; no chunks loaded,
    nothing generated): what ``personalkv eval ask`` and the ingest benchmark measure."""
    checked = _check(svc, user_id, question, list(photos), AskOptions(top_k=top_k))
    return _retrieve(svc, user_id, checked, top_k, svc.adapter.fingerprint())


def ask(svc: Services, user_id: str, question: str, photos: Sequence[bytes] = (),
        options: AskOptions | None = None, on_token=None, *, conversation_id: str | None = None,
        start_conversation: bool = False, call: CallLimits = CallLimits()) -> AskResult:
    """Answer ``question`` for ``user_id`` with their retrieved concepts' chunks in front.
    ``on_token(token_id)`` is called per generated token (``ask_stream`` uses it).
    ``start_conversation``: keep this turn's KV and return the new conversation's id;
    ``conversation_id``: a follow-up in that conversation (``service_layer.conversations``).
    RESOURCE_EXHAUSTED when the answering process's queue is full (retry later): decided first,
    before any work on the request (an overloaded server refuses at once)."""
    options = options or AskOptions()
    with svc.answerer.admit(call.deadline):
        return _answer(svc, user_id, _check(svc, user_id, question, list(photos), options), options,
                       on_token, conversation_id, start_conversation, call)


def _answer(svc: Services, user_id: str, checked: _Checked, options: AskOptions,
            on_token=None, conversation_id: str | None = None,
            start_conversation: bool = False, call: CallLimits = CallLimits()) -> AskResult:
    """The Ask after its admission (``answerer.admit``, held by the caller) and checks."""
    adapter = svc.adapter
    fingerprint = adapter.fingerprint()
    answerer = svc.answerer

    with conversations.turn(svc, user_id, conversation_id, start_conversation, adapter) as conv:
        # what a follow-up's answer rests on besides this turn's evidence: the conversation's
        earlier = [e for turn in conv.record.turns for e in turn.evidence] \
            if conv is not None and conv.is_followup else []
        t0 = time.perf_counter()
        result = _retrieve(svc, user_id, checked, options.top_k, fingerprint, call)
        t1 = time.perf_counter()
        picked = result.concepts
        if conv is not None and conv.is_followup:
            # A follow-up brings only its own evidence: concepts its photo shows or its
            # question names, and not already in the conversation (conversations module doc).
            have = set(conv.record.concept_ids)
            picked = [c for c in picked if c.concept_id not in have
                      and (c.named or (checked.photo is not None and c.image_score > 0))]
        readable = answerable(svc, user_id, [c.concept_id for c in picked])
        picked = [c for c in picked if c.concept_id in readable]
        loaded = load_chunks(svc, user_id, [(c.concept_id, ref) for c in picked for ref in c.chunks])
        scores = {c.concept_id: c.score for c in result.concepts}
        used = [UsedChunk(ref.chunk_id, concept_id, ref.kind, scores[concept_id])
                for concept_id, ref in loaded.refs]
        t2 = time.perf_counter()
        ratio = svc.settings.model.recompute_ratio if options.recompute_ratio is None else options.recompute_ratio
        generation = GenerationOptions(
            max_new_tokens=options.max_new_tokens, temperature=options.temperature,
            top_p=options.top_p, seed=options.seed, recompute_ratio=ratio,
            recompute_strategy=svc.settings.model.recompute_strategy,
        )
        # A text-only model cannot see the photo: it found the concepts (retrieval), that is all.
        model_photo = checked.photo if checked.photo and adapter.supports_images else None
        model_image = model_photo.image if model_photo is not None else None
        reused = sum(c.meta.token_count for c in loaded.chunks)
        if conv is not None and not conv.rebuild_s:
            reused += conv.state.kv_tokens  # the kept history (0 on a first turn)
        if conv is not None:
            conv.check_room(adapter, loaded.chunks, checked.question, generation.max_new_tokens)
        job = ModelJob(state=conv.state if conv is not None else ConversationKV(),
                       chunks=loaded.chunks, question=checked.question, image=model_image,
                       options=generation, on_token=on_token, keep=conv is not None,
                       deadline=call.deadline, cancelled=call.cancelled)
        out = answerer.run(job)
        if conv is not None:
            conv.record_turn(checked.question,
                             [PlacedEvidence(concept_id=c, chunk=ref) for c, ref in loaded.refs],
                             model_photo, out.text.strip(), out.token_ids, generation)
    timings = Timings(retrieve=t1 - t0, load=t2 - t1, place=out.timings["place"],
                      recompute=out.timings["recompute"], prefill=out.timings["prefill"],
                      decode=out.timings["decode"], rebuild=conv.rebuild_s if conv is not None else 0.0,
                      queue=job.queue_s)
    # The concepts the answer rests on: those whose chunks were placed now (a skipped chunk's
    # concept is not one of them), and in a follow-up those placed by earlier turns too.
    placed_now = {concept_id for concept_id, _ in loaded.refs}
    earlier_concepts = dict.fromkeys(e.concept_id for e in earlier)
    used_concepts = [UsedConcept(c, scores.get(c, 0.0)) for c in earlier_concepts if c not in placed_now] + \
        [UsedConcept(c.concept_id, c.score) for c in picked if c.concept_id in placed_now]
    rested_on = [UsedChunk(e.chunk.chunk_id, e.concept_id, e.chunk.kind, scores.get(e.concept_id, 0.0), True)
                 for e in earlier]
    return AskResult(
        answer=out.text.strip(),
        concepts=used_concepts,
        chunks=rested_on + used, timings=timings,
        personal_evidence_used=bool(loaded.chunks) or bool(conv and conv.record.concept_ids),
        token_ids=out.token_ids, skipped_chunks=loaded.skipped, cache_hits=loaded.cache_hits,
        reused_tokens=reused,
        conversation_id=conv.conversation_id if conv is not None else None,
    )


def warm_up(svc: Services) -> None:
    """Do once, before the process reports ready, what the first Asks would otherwise all pay
    for at once: load the model and compute its fingerprint and system prefix, load the
    retriever's encoders and the index's collections (a search for a user id nobody has), and
    answer one question without evidence through the engine (its loop and first forwards). A
    fresh answering server hit by a burst spent its first second on these: 80 admitted Asks
    each hashed the model's weights for its fingerprint (measured with py-spy)."""
    adapter = svc.adapter
    fingerprint = adapter.fingerprint()
    adapter.system_prefix()
    nobody = f"warmup-{uuid.uuid4().hex}"  # a valid id no user has: it reads nothing
    with dependencies("the retrieval index"):
        svc.retriever.retrieve(nobody, "warm up", None, 1, model_fingerprint=fingerprint)
    job = ModelJob(state=ConversationKV(), chunks=[], question="Hello.", image=None,
                   options=GenerationOptions(max_new_tokens=2))
    with svc.answerer.admit():
        svc.answerer.run(job)


_DONE = object()


def ask_stream(svc: Services, user_id: str, question: str, photos: Sequence[bytes] = (),
               options: AskOptions | None = None, *, conversation_id: str | None = None,
               start_conversation: bool = False,
               call: CallLimits = CallLimits()) -> Iterator[str | AskResult]:
    """Yield the answer's text as it is generated (str pieces), then the final AskResult.
    Validation errors raise before the first yield. Closing the generator early stops the
    generation at the next token."""
    options = options or AskOptions()
    admission = ExitStack()  # taken here (refused at once when full), given back by the worker
    admission.enter_context(svc.answerer.admit(call.deadline))
    try:
        checked = _check(svc, user_id, question, list(photos), options)  # fail fast, in the caller
    except BaseException:
        admission.close()
        raise
    events: queue.Queue = queue.Queue()
    cancelled = threading.Event()

    class _Cancelled(Exception):
        pass

    def on_token(token_id: int) -> None:
        if cancelled.is_set():
            raise _Cancelled()
        events.put(("token", token_id))

    def run() -> None:
        try:
            limits = CallLimits(call.deadline, lambda: cancelled.is_set() or call.cancelled())
            events.put(("result", _answer(svc, user_id, checked, options, on_token,
                                          conversation_id, start_conversation, limits)))
        except _Cancelled:
            pass
        except BaseException as exc:  # re-raised in the consumer
            events.put(("error", exc))
        finally:
            admission.close()
            events.put((_DONE, None))

    worker = threading.Thread(target=run, name="pkv-ask-stream", daemon=True)
    worker.start()
    detokenizer = IncrementalDetokenizer(svc.adapter.tokenizer)
    try:
        while True:
            kind, value = events.get()
            if kind is _DONE:
                return
            if kind == "error":
                raise value
            if kind == "result":
                if piece := detokenizer.flush():
                    yield piece
                yield value
                continue
            if piece := detokenizer.add(value):
                yield piece
    finally:
        cancelled.set()
