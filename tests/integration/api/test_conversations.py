"""Conversations through gRPC: started by Ask, continued by id (unary and stream), bound to the
token's user (another user's id is NOT_FOUND with the same message as a missing one), listed,
ended, and continued by a second answering server over the same store after the first one is
stopped (its KV rebuilt from the record: the same greedy answer)."""

from __future__ import annotations

import grpc

from tests.integration.api.conftest import png, status_of


def test_a_conversation_through_grpc(api):
    with api.client("dora") as dora, api.client("eve") as eve:
        dora.create_concept("rex", "Rex", "dog", "my brown dog; he loves the park")
        dora.upload_photos("rex", [png(20), png(21)])
        dora.wait_ready("rex", timeout_s=120)

        first = dora.ask("What does Rex like?", max_new_tokens=4, start_conversation=True)
        cid = first.conversation_id
        assert len(cid) == 64 and first.personal_evidence_used
        events = list(dora.ask_stream("And where does he love to go?", max_new_tokens=4,
                                      conversation_id=cid))
        final = events[-1].final
        assert final.conversation_id == cid and final.personal_evidence_used
        assert final.timings.rebuild_ms == 0  # this server kept the KV

        plain = dora.ask("What does Rex like?", max_new_tokens=4)
        assert plain.conversation_id == ""  # single-turn: nothing kept
        listed = dora.list_conversations()
        assert [(c.conversation_id, c.turns, list(c.concept_ids)) for c in listed] == [(cid, 2, ["rex"])]

        code, message = status_of(lambda: eve.ask("And then?", max_new_tokens=4, conversation_id=cid))
        code_missing, message_missing = status_of(
            lambda: eve.ask("And then?", max_new_tokens=4, conversation_id="e" * 64))
        assert code == code_missing == grpc.StatusCode.NOT_FOUND
        assert message == message_missing.replace("e" * 64, cid)
        assert eve.list_conversations() == [] and not eve.end_conversation(cid)

        # Another process goes on where this one stopped: drop the kept KV (what a restart or
        # another replica sees) and ask what this server would answer from its kept KV.
        kept = dora.ask("Is he a good dog?", max_new_tokens=6, conversation_id=cid)
        record, version = api.services.store.read_conversation("dora", cid)
        api.services.store.update_conversation(
            record.model_copy(update={"turns": record.turns[:2]}), version)
        api.services.conversations.drop("dora")
        rebuilt = dora.ask("Is he a good dog?", max_new_tokens=6, conversation_id=cid)
        assert rebuilt.timings.rebuild_ms > 0 and rebuilt.answer == kept.answer

        assert dora.end_conversation(cid) and dora.list_conversations() == []
        assert status_of(lambda: dora.ask("And then?", max_new_tokens=4, conversation_id=cid))[0] \
            == grpc.StatusCode.NOT_FOUND
        assert status_of(lambda: dora.ask("x", max_new_tokens=4, conversation_id="bad"))[0] \
            == grpc.StatusCode.INVALID_ARGUMENT
