"""One damaged manifest (a truncated object in the store) concerns its concept alone (local
store, the in-memory index, tiny Qwen2-VL, tasks inline): the owner's listing, reads, uploads
and Asks go on, the concept reads as FAILED with a reason that names no key or exception and
can be deleted, and a reconciler pass skips and counts it and finishes everyone else's work.
The same over the real S3 server: tests/integration/service_layer/test_damaged_manifest.py."""

from __future__ import annotations

import logging
import pytest

from personalkv.service_layer import answering, concepts, evidence, reconciler
from personalkv.service_layer._common import DAMAGED_REASON
from personalkv.service_layer.answering import AskOptions
from personalkv.errors import FailedPrecondition

BLUE, RED = (30, 60, 200), (200, 40, 40)


def truncate_manifest(svc, user_id: str, concept_id: str) -> None:
    key = svc.store.manifest_key(user_id, concept_id)
    data = svc.store.objects.get(key)
    svc.store.objects.put(key, data[: len(data) // 2], "application/json")


def refused_upload(svc, photo, user_id: str, concept_id: str) -> None:
    """A concept whose upload was refused while the broker was down: photos stored, queued, no
    lease (what concepts.add_photos leaves behind); only the reconciler finishes it."""
    concepts.create_concept(svc, user_id, concept_id, "Kiki", "plant", "a fern")
    record = svc.store.put_photo(user_id, concept_id, photo)
    m = concepts.get_concept(svc, user_id, concept_id)
    svc.store.write_manifest(m.model_copy(update={"photos": [record], "lease_until": None}))


def skipped_count(reason: str) -> float:
    return reconciler.RECONCILER_SKIPPED.labels(reason)._value.get()


def check_isolation(svc, photo_of, caplog) -> None:
    concepts.create_concept(svc, "alice", "mug", "Bobo", "mug", "my blue mug")
    concepts.add_photos(svc, "alice", "mug", [photo_of(BLUE, 1)])
    concepts.create_concept(svc, "alice", "u021", "Rex", "toy", "a red toy")
    concepts.add_photos(svc, "alice", "u021", [photo_of(RED, 2)])
    refused_upload(svc, photo_of(BLUE, 3), "bob", "fern")
    named = answering.ask(svc, "alice", "What is Rex?", [], AskOptions(max_new_tokens=2))
    assert "u021" in {c for c, *_ in named.concepts}  # answered from (its chunks now cached)
    truncate_manifest(svc, "alice", "u021")
    # Damaged: not answered from once its manifest is read again (after MANIFEST_RECHECK_S;
    # issue 30), though its keys and cached chunks remain.
    evidence._verified.clear()
    named = answering.ask(svc, "alice", "What is Rex?", [], AskOptions(max_new_tokens=2))
    assert "u021" not in {c for c, *_ in named.concepts}
    assert all(chunk.concept_id != "u021" for chunk in named.chunks)

    listed = {m.concept_id: m for m in concepts.list_concepts(svc, "alice")}
    assert listed["mug"].state == "ready"
    broken = listed["u021"]
    assert (broken.state, broken.failure_reason) == ("failed", DAMAGED_REASON)
    for text in ("manifest", "users/", "Error", "json"):  # no key, no exception, no parser text
        assert text not in broken.failure_reason
    assert concepts.get_concept(svc, "alice", "u021").state == "failed"
    assert concepts.get_concept(svc, "alice", "mug").state == "ready"
    assert len(concepts.add_photos(svc, "alice", "mug", [photo_of(BLUE, 4)]).photos) == 2
    with pytest.raises(FailedPrecondition, match="'u021'.*delete the concept and create it again"):
        concepts.add_photos(svc, "alice", "u021", [photo_of(RED, 5)])
    # Her Asks, with a photo too (the recognizer reads every manifest of hers), still answer.
    answer = answering.ask(svc, "alice", "Where is Bobo?", [photo_of(BLUE, 1)],
                           AskOptions(max_new_tokens=2))
    assert "mug" in {c for c, *_ in answer.concepts}

    before = skipped_count("damaged_manifest")
    with caplog.at_level(logging.WARNING, logger="personalkv.service_layer.reconciler"):
        done = reconciler.reconcile(svc)
    assert ("bob", "fern", "mining") in done  # not stalled behind alice's damaged manifest
    assert concepts.get_concept(svc, "bob", "fern").state == "ready"
    assert skipped_count("damaged_manifest") == before + 1
    assert any("alice/u021" in r.getMessage() for r in caplog.records)

    assert concepts.delete_concept(svc, "alice", "u021") is True
    assert [m.concept_id for m in concepts.list_concepts(svc, "alice")] == ["mug"]
    assert concepts.delete_concept(svc, "alice", "u021") is False


def test_a_damaged_manifest_concerns_its_concept_alone(svc, photo_of, caplog):
    check_isolation(svc, photo_of, caplog)


def test_a_task_for_a_concept_with_a_damaged_manifest_is_dropped(svc, photo_of):
    from personalkv.service_layer import pipeline

    concepts.create_concept(svc, "alice", "u021", "Rex", "toy", "a red toy")
    concepts.add_photos(svc, "alice", "u021", [photo_of(RED, 2)])
    truncate_manifest(svc, "alice", "u021")
    assert pipeline.mine_concept(svc, "alice", "u021") is None  # no retry loop, no crash
    assert pipeline.cache_concept(svc, "alice", "u021") is None


def test_a_lapsed_concept_that_fails_to_enqueue_is_skipped_not_the_pass(svc, photo_of):
    refused_upload(svc, photo_of(BLUE, 1), "alice", "first")
    refused_upload(svc, photo_of(RED, 2), "bob", "second")
    real = svc.task_queue.enqueue_mining

    def enqueue(user_id, concept_id):
        if user_id == "alice":
            raise RuntimeError("a bug in one concept's enqueue")
        return real(user_id, concept_id)

    svc.task_queue.enqueue_mining = enqueue
    before = skipped_count("error")
    assert reconciler.reconcile(svc) == [("bob", "second", "mining")]
    assert skipped_count("error") == before + 1
