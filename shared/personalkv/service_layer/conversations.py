"""Conversations: follow-up questions answered from the conversation's kept KV.

``answering.ask(..., start_conversation=True)`` opens one and returns its id;
``answering.ask(..., conversation_id=ID)`` asks a follow-up in it. This module gives the Ask
path one turn of a conversation (``turn``) and holds the user-facing use cases:

  list_conversations(svc, user_id) -> list[ConversationRecord]
  end_conversation(svc, user_id, conversation_id) -> bool          (idempotent)

A turn, in order:
1. The record is read from the user's prefix (``users/<user>/conversations/<id>.json``); a
   missing id and another user's id are the same NOT_FOUND (the key holds the caller's user).
   Ids are 256 random bits.
2. Only one turn of a conversation runs at a time: a second concurrent Ask on it is refused with
   ABORTED in this process, and across processes the record's compare-and-set refuses the turn
   that lost the race (ABORTED, its answer is not recorded).
3. The conversation's KV comes from this process's ``ConversationCache`` when it holds the KV
   of exactly the recorded turns; otherwise (another replica answered the last turn, eviction,
   idle TTL, restart) it is rebuilt from the record by replaying every turn
   (``ConversationKV.turn(..., answer_ids=...)``): only speed is lost.
4. Limits: at most ``PERSONALKV_SERVICE_MAX_CONVERSATION_TURNS`` questions and
   ``PERSONALKV_SERVICE_MAX_CONVERSATION_TOKENS`` tokens of KV (0: the model's context window),
   the next answer's ``max_new_tokens`` included. Past either the question answers
   FAILED_PRECONDITION saying to start a new conversation: no turn is ever dropped silently.
5. After the answer the turn is appended to the record (compare-and-set) and the KV kept.

Evidence: the first turn places what retrieval found, as a single Ask does. A follow-up adds
only evidence it brings itself, the concepts its photo shows or its question names, and only
those not in the conversation yet; a follow-up that only resembles another concept's text ("and
where does he love to go?") adds nothing, so the conversation stays about what it is about.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from personalkv.ids import InvalidIdError, validate_hex_digest
from personalkv.conversation_record import ConversationRecord, PlacedEvidence, TurnRecord
from personalkv.images import ValidatedPhoto, decode
from personalkv.kv.conversation import ConversationKV
from personalkv.kv.chunk import KVChunk
from personalkv.kv.generation import GenerationOptions
from personalkv.models.base import ModelAdapter
from personalkv.service_layer._common import check_ids, dependencies
from personalkv.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound
from personalkv.service_layer.evidence import load_chunks
from personalkv.service_layer.services import Services
from personalkv.storage.base import ObjectNotFound, PreconditionFailed

log = logging.getLogger(__name__)

_NOT_FOUND = "conversation {!r} does not exist (it ended, or never was yours)"


def _check_id(conversation_id: str) -> None:
    try:
        validate_hex_digest(conversation_id, "conversation id")
    except InvalidIdError:
        raise InvalidArgument("conversation_id must be the 64-character id Ask returned") from None


@dataclass
class ConversationTurn:
    """One turn of a conversation, held by the Ask path between ``turn``'s enter and exit."""

    svc: Services
    record: ConversationRecord
    version: str | None  # None: a new conversation, not stored yet
    state: ConversationKV
    rebuild_s: float = 0.0  # seconds spent replaying the record (0: the KV was kept here)

    @property
    def conversation_id(self) -> str:
        return self.record.conversation_id

    @property
    def is_followup(self) -> bool:
        return bool(self.record.turns)

    def check_room(self, adapter: ModelAdapter, chunks: list[KVChunk], question: str,
                   max_new_tokens: int) -> None:
        """FAILED_PRECONDITION when this turn would pass the conversation's limits."""
        limits = self.svc.settings.service
        if len(self.record.turns) >= limits.max_conversation_turns:
            raise FailedPrecondition(
                f"the conversation has {len(self.record.turns)} questions, the limit; start a new one")
        limit = limits.max_conversation_tokens or int(
            getattr(adapter.text_config, "max_position_embeddings", 0) or 1 << 30)
        framing = len(adapter.tokenize(adapter.next_turn_text + question + adapter.chat_framing[1]))
        needed = (self.state.kv_tokens or adapter.system_prefix().num_tokens) + framing \
            + sum(c.meta.token_count for c in chunks) + max_new_tokens
        if needed > limit:
            raise FailedPrecondition(
                f"this question would take the conversation to about {needed} tokens, past its "
                f"limit of {limit}; start a new conversation")

    def record_turn(self, question: str, evidence: list[PlacedEvidence],
                    photo: ValidatedPhoto | None, answer: str, answer_ids: list[int],
                    options: GenerationOptions) -> None:
        """Append the answered turn to the record (compare-and-set; ABORTED when another
        process appended one first) and keep the KV for the next turn."""
        svc, record = self.svc, self.record
        user_id, cid = record.user_id, record.conversation_id
        with dependencies("the object store"):
            photo_key = None if photo is None else svc.store.put_conversation_photo(
                user_id, cid, len(record.turns), photo)
            turn = TurnRecord(question=question, evidence=evidence, photo_key=photo_key,
                              answer=answer, answer_token_ids=answer_ids,
                              max_new_tokens=options.max_new_tokens,
                              recompute_ratio=options.recompute_ratio,
                              recompute_strategy=options.recompute_strategy)
            updated = record.model_copy(update={"turns": [*record.turns, turn],
                                                "kv_tokens": self.state.kv_tokens})
            try:
                if self.version is None:
                    self.record = svc.store.create_conversation(updated)
                else:
                    self.record = svc.store.update_conversation(updated, self.version)
            except ObjectNotFound:
                raise NotFound(_NOT_FOUND.format(cid) + "; it ended during this question") from None
            except PreconditionFailed:
                raise Aborted("another question in this conversation was answered meanwhile; "
                              "ask again") from None
        svc.conversations.keep((user_id, cid), self.state)


@contextmanager
def turn(svc: Services, user_id: str, conversation_id: str | None, start: bool,
         adapter: ModelAdapter) -> Iterator[ConversationTurn | None]:
    """The conversation turn of an Ask (None for a single-turn Ask); see the module docstring."""
    if conversation_id and start:
        raise InvalidArgument("give conversation_id or start_conversation, not both")
    if not conversation_id and not start:
        yield None
        return
    fingerprint = adapter.fingerprint()
    if start:
        cid = secrets.token_hex(32)
        record, version = ConversationRecord(conversation_id=cid, user_id=user_id,
                                             model_fingerprint=fingerprint), None
    else:
        _check_id(conversation_id)
        cid = conversation_id
        with dependencies("the object store"):
            record, version = svc.store.read_conversation(user_id, cid)
        if record is None:  # ended, or its user deleted: live KV here goes with it
            svc.conversations.drop(user_id, cid)
            raise NotFound(_NOT_FOUND.format(cid))
        _refuse_deleted_evidence(svc, record)
        if record.model_fingerprint != fingerprint:
            raise FailedPrecondition("the assistant's model changed since this conversation "
                                     "started; start a new conversation")
    key = (user_id, cid)
    if not svc.conversations.begin(key):
        raise Aborted("another question in this conversation is being answered; ask again "
                      "when it is done")
    try:
        state, rebuild_s = svc.conversations.take(key) if version is not None else None, 0.0
        if state is None or state.turns != len(record.turns):
            started = time.perf_counter()
            state = _rebuild(svc, record, adapter) if record.turns else ConversationKV()
            rebuild_s = time.perf_counter() - started if record.turns else 0.0
        yield ConversationTurn(svc, record, version, state, rebuild_s)
    finally:
        svc.conversations.end(key)


def _refuse_deleted_evidence(svc: Services, record: ConversationRecord) -> None:
    """A follow-up rests on every concept its conversation placed: if one was deleted (by any
    process: its manifest is gone from the shared store), the live KV holding its evidence is
    dropped here, its chunks leave this process's cache, and the turn is refused. Checked on
    every turn, so deletion reaches every answering replica at the next use (staleness: at most
    the turn in flight when DeleteConcept returned)."""
    user_id = record.user_id
    with dependencies("the object store"):
        deleted = [c for c in record.concept_ids if not svc.store.has_concept(user_id, c)]
    if deleted:
        svc.conversations.drop(user_id, record.conversation_id)
        for concept_id in deleted:
            svc.chunk_cache.invalidate(user_id, concept_id)
        raise FailedPrecondition(f"this conversation rests on {', '.join(deleted)}, deleted since; "
                                 "start a new conversation")


def _rebuild(svc: Services, record: ConversationRecord, adapter: ModelAdapter) -> ConversationKV:
    """The conversation's KV, replayed from its record: the same operations in the same order
    as the turns that built it (module docstring of ``kv.conversation``)."""
    user_id, state = record.user_id, ConversationKV()
    for turn in record.turns:
        loaded = load_chunks(svc, user_id, [(e.concept_id, e.chunk) for e in turn.evidence])
        if loaded.skipped:
            raise FailedPrecondition("evidence this conversation rests on was deleted or "
                                     "re-cached since; start a new conversation")
        image = None
        if turn.photo_key is not None:
            with dependencies("the object store"):
                image = decode(svc.store.get_conversation_photo(
                    user_id, record.conversation_id, turn.photo_key))
        options = GenerationOptions(max_new_tokens=turn.max_new_tokens,
                                    recompute_ratio=turn.recompute_ratio,
                                    recompute_strategy=turn.recompute_strategy)
        # The replay is model work: it runs on the engine's loop, between other requests' steps
        # (the object store reads above stay in this thread).
        svc.answerer.run_in_loop(lambda chunks=loaded.chunks, turn=turn, image=image, options=options:
                                 state.turn(adapter, chunks, turn.question, image, options=options,
                                            answer_ids=turn.answer_token_ids))
    log.info("conversation %s of %s rebuilt from its record (%d turns, %d tokens)",
             record.conversation_id[:12], user_id, state.turns, state.kv_tokens)
    return state


def list_conversations(svc: Services, user_id: str) -> list[ConversationRecord]:
    """The user's conversations, oldest first."""
    check_ids(user_id)
    with dependencies("the object store"):
        return svc.store.list_conversations(user_id)


def end_conversation(svc: Services, user_id: str, conversation_id: str) -> bool:
    """Forget a conversation (record, photos, live KV). Idempotent: returns whether it existed."""
    check_ids(user_id)
    _check_id(conversation_id)
    with dependencies("the object store"):
        existed = svc.store.delete_conversation(user_id, conversation_id)
    svc.conversations.drop(user_id, conversation_id)
    return existed
