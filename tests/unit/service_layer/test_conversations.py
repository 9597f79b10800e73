"""Conversations through the use cases: a follow-up answered from the kept KV, the same answer
after a rebuild on a fresh process (``bootstrap`` again over the same store), ids bound to
their user, listing and ending, limits, one turn at a time, and no read of another user's data
whatever the mix of users, ids and deletes (property test)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from personalkv.bootstrap import bootstrap
from personalkv.service_layer import answering, concepts, conversations
from personalkv.service_layer.answering import AskOptions
from personalkv.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound
from tests.unit.service_layer.test_recognizer_in_ask import _ingest, _photo

GREEDY = AskOptions(max_new_tokens=8)


def _start(svc, user="alice", question="Tell me about Thing0.", photos=()):
    first = answering.ask(svc, user, question, list(photos), GREEDY, start_conversation=True)
    assert first.conversation_id and len(first.conversation_id) == 64
    return first


def test_a_follow_up_uses_the_kept_kv_and_a_fresh_process_gives_the_same_answer(svc, service_settings, tiny):
    _ingest(svc, 0)
    _ingest(svc, 1)
    first = _start(svc)
    assert [c.concept_id for c in first.concepts] == ["thing0"] and first.personal_evidence_used
    cid = first.conversation_id
    assert svc.conversations.stats().entries == 1
    second = answering.ask(svc, "alice", "And where does it live?", [], GREEDY, conversation_id=cid)
    assert second.conversation_id == cid and second.personal_evidence_used
    # nothing new: the turn-1 evidence is in the kept KV already, and the answer rests on it
    assert [c for c in second.chunks if not c.from_earlier_turn] == []
    assert [c.chunk_id for c in second.chunks] == [c.chunk_id for c in first.chunks]
    assert [c.concept_id for c in second.concepts] == ["thing0"]
    # A follow-up that names another concept adds that concept's chunks after the history.
    third = answering.ask(svc, "alice", "Is Thing1 older?", [], GREEDY, conversation_id=cid)
    assert {c.concept_id for c in third.chunks if not c.from_earlier_turn} == {"thing1"}
    assert [c.concept_id for c in third.concepts] == ["thing0", "thing1"]

    # "The pod dies": a new process (fresh Services over the same store and index) goes on.
    fourth_here = answering.ask(svc, "alice", "Which one is blue?", [], GREEDY, conversation_id=cid)
    other = bootstrap(service_settings, adapter=tiny("qwen2_vl"))
    other.replace("index", svc.index)  # memory:// is per process: share the one index here
    try:
        assert other.conversations.stats().entries == 0
        record, _ = svc.store.read_conversation("alice", cid)
        record = record.model_copy(update={"turns": record.turns[:3]})  # as before turn 4
        svc.store.objects.put(svc.store.conversation_key("alice", cid), record.to_json())
        fourth_there = answering.ask(other, "alice", "Which one is blue?", [], GREEDY, conversation_id=cid)
    finally:
        other.close()
    assert fourth_there.token_ids == fourth_here.token_ids and fourth_there.answer == fourth_here.answer


def test_a_deletion_by_another_process_reaches_this_ones_conversations(svc, service_settings, tiny):
    """Issue 30: DeleteConcept served by one process (its own caches), then a follow-up on
    another that holds the conversation live, and one that would rebuild it from its chunk
    cache: both refused, the live KV and the cached chunks dropped. Same for deleting a user."""
    _ingest(svc, 0)
    _ingest(svc, 1)
    live = _start(svc).conversation_id
    cold = _start(svc, question="What is Thing0?").conversation_id
    svc.conversations.drop("alice", cold)  # evicted here: its next turn would rebuild
    assert len(svc.chunk_cache) > 0
    deleting = bootstrap(service_settings, adapter=tiny("qwen2_vl"))
    deleting.replace("index", svc.index)  # memory:// is per process: share the one index here
    try:
        assert concepts.delete_concept(deleting, "alice", "thing0")
    finally:
        deleting.replace("index", None)  # the shared index is not this process's to close
        deleting.close()
    for cid in (live, cold):
        with pytest.raises(FailedPrecondition, match="thing0, deleted since"):
            answering.ask(svc, "alice", "And what colour is it?", [], GREEDY, conversation_id=cid)
    assert svc.conversations.stats().entries == 0
    assert all(key[1] != "thing0" for key in svc.chunk_cache._lru)  # noqa: SLF001 - the held data
    # deleting the user: its conversations' records go, and a live one here is dropped on sight
    other_live = _start(svc, question="Tell me about Thing1.").conversation_id
    deleting = bootstrap(service_settings, adapter=tiny("qwen2_vl"))
    deleting.replace("index", svc.index)
    try:
        concepts.delete_user(deleting, "alice")
    finally:
        deleting.replace("index", None)  # the shared index is not this process's to close
        deleting.close()
    with pytest.raises(NotFound):
        answering.ask(svc, "alice", "And then?", [], GREEDY, conversation_id=other_live)
    assert svc.conversations.stats().entries == 0


def test_a_plain_ask_stores_nothing(svc):
    _ingest(svc, 0)
    result = answering.ask(svc, "alice", "Tell me about Thing0.", [], GREEDY)
    assert result.conversation_id is None
    assert conversations.list_conversations(svc, "alice") == []
    assert not any("/conversations/" in k for k in svc.store.objects.list("users/alice/"))


def test_ids_are_bound_to_their_user_and_listed_and_ended(svc):
    _ingest(svc, 0)
    _ingest(svc, 0, user="bob")
    cid = _start(svc).conversation_id
    missing = "f" * 64
    with pytest.raises(NotFound) as other:
        answering.ask(svc, "bob", "And then?", [], GREEDY, conversation_id=cid)
    with pytest.raises(NotFound) as unknown:
        answering.ask(svc, "bob", "And then?", [], GREEDY, conversation_id=missing)
    assert other.value.message == unknown.value.message.replace(missing, cid)
    with pytest.raises(InvalidArgument):
        answering.ask(svc, "alice", "And then?", [], GREEDY, conversation_id="../../bob")
    assert [r.conversation_id for r in conversations.list_conversations(svc, "alice")] == [cid]
    assert conversations.list_conversations(svc, "bob") == []
    assert not conversations.end_conversation(svc, "bob", cid)  # not bob's: nothing happens
    assert conversations.end_conversation(svc, "alice", cid)
    assert not conversations.end_conversation(svc, "alice", cid)  # idempotent
    with pytest.raises(NotFound):
        answering.ask(svc, "alice", "And then?", [], GREEDY, conversation_id=cid)


def test_forgetting_a_user_deletes_their_conversations(svc):
    _ingest(svc, 0)
    cid = _start(svc, photos=[_photo(0, 5)]).conversation_id
    assert any("/conversations/" in k for k in svc.store.objects.list("users/alice/"))
    concepts.delete_user(svc, "alice")
    assert list(svc.store.objects.list("users/alice/")) == []
    assert svc.conversations.stats().entries == 0
    with pytest.raises(NotFound):
        answering.ask(svc, "alice", "And then?", [], GREEDY, conversation_id=cid)


def test_limits_answer_failed_precondition(svc, service_settings):
    _ingest(svc, 0)
    svc.settings = service_settings.model_copy(update={"service": service_settings.service.model_copy(
        update={"max_conversation_turns": 2})})
    cid = _start(svc).conversation_id
    answering.ask(svc, "alice", "And then?", [], GREEDY, conversation_id=cid)
    with pytest.raises(FailedPrecondition, match="limit; start a new one"):
        answering.ask(svc, "alice", "And after that?", [], GREEDY, conversation_id=cid)
    svc.settings = service_settings.model_copy(update={"service": service_settings.service.model_copy(
        update={"max_conversation_tokens": 64})})
    with pytest.raises(FailedPrecondition, match="past its limit of 64"):
        _start(svc)
    assert len(conversations.list_conversations(svc, "alice")) == 1  # the refused one: not stored


def test_one_turn_at_a_time(svc):
    _ingest(svc, 0)
    cid = _start(svc).conversation_id
    assert svc.conversations.begin(("alice", cid))  # a turn of it is running
    try:
        with pytest.raises(Aborted):
            answering.ask(svc, "alice", "And then?", [], GREEDY, conversation_id=cid)
    finally:
        svc.conversations.end(("alice", cid))
    # Another process appended a turn meanwhile: this one's record write loses, ABORTED.
    record, version = svc.store.read_conversation("alice", cid)
    real = svc.store.update_conversation

    def racing(updated, _version):
        real(record.model_copy(update={"kv_tokens": record.kv_tokens}), version)  # bumps it
        return real(updated, _version)

    svc.store.update_conversation = racing
    try:
        with pytest.raises(Aborted):
            answering.ask(svc, "alice", "And then?", [], GREEDY, conversation_id=cid)
    finally:
        del svc.store.update_conversation
    assert len(svc.store.read_conversation("alice", cid)[0].turns) == 1


USERS = ["alice", "bob", "carol"]
_ops = st.lists(st.tuples(st.sampled_from(["start", "follow", "end", "forget"]),
                          st.sampled_from(USERS), st.integers(0, 5)), min_size=3, max_size=10)


@hsettings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_ops)
def test_no_operation_reads_another_users_objects(svc, monkeypatch, ops):
    for user in USERS:
        if not svc.store.list_concepts(user):
            _ingest(svc, 0, user=user)
    reads: list[tuple[str, str]] = []
    acting = {"user": ""}
    objects = svc.store.objects
    for name in ("get", "get_versioned", "exists"):
        real = getattr(type(objects), name)
        monkeypatch.setattr(objects, name, lambda key, *a, _real=real, **k: (
            reads.append((acting["user"], key)), _real(objects, key, *a, **k))[1])
    ids: list[tuple[str, str]] = []
    for op, user, pick in ops:
        acting["user"] = user
        target = ids[pick % len(ids)] if ids else (user, "0" * 64)
        try:
            if op == "start":
                ids.append((user, _start(svc, user).conversation_id))
            elif op == "follow":
                result = answering.ask(svc, user, "And then?", [], GREEDY, conversation_id=target[1])
                assert target[0] == user and result.conversation_id == target[1]
            elif op == "end":
                conversations.end_conversation(svc, user, target[1])
            else:
                concepts.delete_user(svc, user)
                _ingest(svc, 0, user=user)
        except NotFound:
            assert op == "follow"  # another user's id, an ended one or a forgotten user's
        except FailedPrecondition:
            pass  # the user was forgotten and re-ingested: the old evidence is gone
    foreign = [(u, k) for u, k in reads if u and not (k.startswith(f"users/{u}/") or k == f"stamps/{u}")]
    assert foreign == []
