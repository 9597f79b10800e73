"""The use cases end to end in one process: real local object store, the in-memory key index,
the tiny Qwen2-VL, tasks run inline."""

from __future__ import annotations

import os
from dataclasses import asdict

import pytest
from personalkv.bootstrap import task_handlers
from personalkv.images import decode
from personalkv.service_layer import answering, concepts, pipeline
from personalkv.service_layer.answering import AskOptions, AskResult
from personalkv.errors import AlreadyExists, InvalidArgument, NotFound, Unavailable

BLUE, RED = (30, 60, 200), (210, 40, 30)


def chunk_files(svc, user, concept):
    prefix = svc.store.concept_prefix(user, concept) + "chunks/"
    return sorted(svc.store.objects.list(prefix))


def mtimes(svc, keys):
    root = svc.store.objects.root if hasattr(svc.store.objects, "root") else None
    return {k: os.stat(os.path.join(str(root), k)).st_mtime_ns for k in keys} if root else {}


def make_ready(svc, photo_of, user="alice", concept="mug", name="Bobo", colour=BLUE, n=2):
    concepts.create_concept(svc, user, concept, name, "mug", f"my {name} mug with a white square")
    return concepts.add_photos(svc, user, concept, [photo_of(colour, k) for k in range(n)])


def test_create_get_list(svc):
    m = concepts.create_concept(svc, "alice", "mug", "Bobo", "mug", "blue")
    assert (m.state, m.profile.name, m.photos) == ("queued", "Bobo", [])
    assert concepts.get_concept(svc, "alice", "mug").state == "queued"
    assert [c.concept_id for c in concepts.list_concepts(svc, "alice")] == ["mug"]
    assert concepts.list_concepts(svc, "bob") == []
    with pytest.raises(AlreadyExists):
        concepts.create_concept(svc, "alice", "mug", "Other")
    with pytest.raises(NotFound):
        concepts.get_concept(svc, "alice", "nope")


@pytest.mark.parametrize("user,concept,name", [("Alice", "mug", "x"), ("alice", "../x", "x"),
                                               ("alice", "mug", ""), ("alice", "mug", "x" * 201)])
def test_create_refuses_bad_input(svc, user, concept, name):
    with pytest.raises(InvalidArgument):
        concepts.create_concept(svc, user, concept, name)


def test_add_photos_refuses_before_storing_anything(svc, photo_of):
    with pytest.raises(NotFound):
        concepts.add_photos(svc, "alice", "mug", [photo_of(BLUE)])
    concepts.create_concept(svc, "alice", "mug", "Bobo")
    with pytest.raises(InvalidArgument, match="photo 2 of 2"):
        concepts.add_photos(svc, "alice", "mug", [photo_of(BLUE), b"not an image"])
    with pytest.raises(InvalidArgument):
        concepts.add_photos(svc, "alice", "mug", [])
    assert concepts.get_concept(svc, "alice", "mug").photos == []
    assert list(svc.store.objects.list("users/alice/")) == [
        "users/alice/concepts/mug/manifest.json"]


def test_pipeline_makes_a_concept_ready_with_one_chunk_per_patch(svc, photo_of):
    make_ready(svc, photo_of)
    m = concepts.get_concept(svc, "alice", "mug")
    assert m.state == "ready" and m.failure_reason is None
    assert len(m.photos) == 2 and len(m.patches) >= 2
    assert {p.photo_id for p in m.patches} == {p.photo_id for p in m.photos}  # every photo mined
    distinct = len({(p.photo_id, p.box) for p in m.patches})
    assert [c.kind for c in m.chunks] == ["profile_text"] + ["image_patch"] * distinct
    assert [c.source for c in m.chunks][:2] == ["profile", "0"]
    assert m.model_fingerprint == svc.adapter.fingerprint()
    assert chunk_files(svc, "alice", "mug") == sorted(c.object_key for c in m.chunks)
    keys = svc.keys
    hits = [h for space in (keys.text_space, keys.image_space)
            for h in svc.index.entries_of(space, "alice", m.model_fingerprint, ["mug"])]
    assert sorted(h.chunk.chunk_id for h in hits if h.chunk) == sorted(c.chunk_id for c in m.chunks)


def test_redelivered_tasks_change_nothing(svc, photo_of):
    make_ready(svc, photo_of)
    before = concepts.get_concept(svc, "alice", "mug")
    files = chunk_files(svc, "alice", "mug")
    stamps = mtimes(svc, files)
    pipeline.cache_concept(svc, "alice", "mug")  # a redelivered caching task
    pipeline.mine_concept(svc, "alice", "mug")  # a redelivered mining task (re-enqueues caching)
    after = concepts.get_concept(svc, "alice", "mug")
    assert after.state == "ready"
    assert after.chunks == before.chunks and after.patches == before.patches
    assert chunk_files(svc, "alice", "mug") == files
    assert mtimes(svc, files) == stamps  # not rewritten


def test_new_photos_on_a_ready_concept_add_only_their_chunks(svc, photo_of):
    make_ready(svc, photo_of)
    before = concepts.get_concept(svc, "alice", "mug")
    stamps = mtimes(svc, chunk_files(svc, "alice", "mug"))
    # One photo already known (a no-op), one new.
    concepts.add_photos(svc, "alice", "mug", [photo_of(BLUE, 0), photo_of(BLUE, 3)])
    after = concepts.get_concept(svc, "alice", "mug")
    assert after.state == "ready" and len(after.photos) == 3
    n_patches, n_chunks = len(before.patches), len(before.chunks)
    assert after.patches[:n_patches] == before.patches and len(after.patches) > n_patches
    new_photo = after.photos[-1].photo_id
    assert {p.photo_id for p in after.patches[n_patches:]} == {new_photo}  # only the new photo
    assert after.chunks[:n_chunks] == before.chunks and len(after.chunks) > n_chunks
    new_stamps = mtimes(svc, chunk_files(svc, "alice", "mug"))
    assert {k: new_stamps[k] for k in stamps} == stamps  # old chunks untouched


def test_ask_uses_the_named_concept_and_the_hot_chunk_cache(svc, photo_of):
    make_ready(svc, photo_of)
    make_ready(svc, photo_of, concept="ball", name="Redball", colour=RED)
    options = AskOptions(max_new_tokens=6)
    first = answering.ask(svc, "alice", "Where is Bobo?", [], options)
    assert [c for c, _ in first.concepts][0] == "mug"
    assert first.personal_evidence_used and first.chunks
    assert {c.concept_id for c in first.chunks} >= {"mug"}
    assert set(asdict(first.timings)) >= {"retrieve", "load", "place", "prefill", "decode"}
    assert first.cache_hits == 0
    second = answering.ask(svc, "alice", "Where is Bobo?", [], options)
    assert second.cache_hits == len(second.chunks) and second.token_ids == first.token_ids
    assert svc.chunk_cache.stats().hits >= len(second.chunks)
    with_photo = answering.ask(svc, "alice", "What is this?", [photo_of(RED, 4, fmt="JPEG")], options)
    assert with_photo.concepts and with_photo.concepts[0][0] == "ball"


def test_ask_of_a_user_without_concepts_uses_no_personal_evidence(svc):
    result = answering.ask(svc, "nobody", "What is my dog called?", [], AskOptions(max_new_tokens=3))
    assert not result.personal_evidence_used and result.concepts == [] and result.chunks == []


@pytest.mark.parametrize("question,photos,options", [
    ("", [], AskOptions()), ("   ", [], AskOptions()), ("x" * 2001, [], AskOptions()),
    ("ok?", [b"garbage"], AskOptions()), ("ok?", [], AskOptions(max_new_tokens=0)),
    ("ok?", [], AskOptions(top_p=0.0)), ("ok?", [], AskOptions(recompute_ratio=2.0)),
])
def test_ask_refuses_bad_input(svc, question, photos, options):
    with pytest.raises(InvalidArgument):
        answering.ask(svc, "alice", question, photos, options)


def test_ask_stream_yields_text_then_the_same_result(svc, photo_of):
    make_ready(svc, photo_of)
    options = AskOptions(max_new_tokens=8)
    items = list(answering.ask_stream(svc, "alice", "Where is Bobo?", [], options))
    assert isinstance(items[-1], AskResult) and all(isinstance(i, str) for i in items[:-1])
    unary = answering.ask(svc, "alice", "Where is Bobo?", [], options)
    assert items[-1].token_ids == unary.token_ids
    # the pieces are the answer's text (incremental detokenization, engine.detokenizer)
    assert "".join(items[:-1]).strip() == unary.answer
    with pytest.raises(InvalidArgument):
        next(answering.ask_stream(svc, "alice", "", [], options))


@pytest.mark.slow
def test_ask_stream_text_equals_the_unary_answer_smollm2(service_settings, photo_of):
    from personalkv.bootstrap import bootstrap
    from personalkv.config import ModelSettings
    from personalkv.models import load_adapter

    svc = bootstrap(service_settings, adapter=load_adapter("smollm2", settings=ModelSettings()))
    try:
        make_ready(svc, photo_of)
        options = AskOptions(max_new_tokens=40)
        items = list(answering.ask_stream(svc, "alice", "Tell me about Bobo, with an emoji.", [], options))
        unary = answering.ask(svc, "alice", "Tell me about Bobo, with an emoji.", [], options)
        assert items[-1].token_ids == unary.token_ids and len(unary.token_ids) > 5
        assert "".join(items[:-1]).strip() == unary.answer
    finally:
        svc.close()


def test_delete_concept_everywhere_and_idempotent(svc, photo_of):
    make_ready(svc, photo_of)
    answering.ask(svc, "alice", "Where is Bobo?", [], AskOptions(max_new_tokens=2))
    assert len(svc.chunk_cache) > 0
    assert concepts.delete_concept(svc, "alice", "mug") is True
    assert concepts.delete_concept(svc, "alice", "mug") is False  # retry: no error
    assert list(svc.store.objects.list("users/alice/")) == []
    assert svc.index.count(svc.keys.text_space, "alice") == 0
    assert svc.index.count(svc.keys.image_space, "alice") == 0
    assert len(svc.chunk_cache) == 0
    result = answering.ask(svc, "alice", "Where is Bobo?", [], AskOptions(max_new_tokens=2))
    assert not result.personal_evidence_used
    with pytest.raises(NotFound):
        concepts.get_concept(svc, "alice", "mug")


def test_delete_user_leaves_other_users_alone(svc, photo_of):
    make_ready(svc, photo_of, user="alice")
    make_ready(svc, photo_of, user="bob")
    assert concepts.delete_user(svc, "alice") == 1
    assert concepts.delete_user(svc, "alice") == 0
    assert concepts.list_concepts(svc, "alice") == []
    assert svc.index.count(svc.keys.text_space, "alice") == 0
    assert concepts.get_concept(svc, "bob", "mug").state == "ready"
    assert answering.ask(svc, "bob", "Where is Bobo?", [], AskOptions(max_new_tokens=2)).concepts


def test_a_failing_task_marks_the_concept_failed_and_a_retry_recovers(svc, photo_of):
    concepts.create_concept(svc, "alice", "mug", "Bobo")
    m = concepts.add_photos(svc, "alice", "mug", [photo_of(BLUE)])
    assert m is not None
    # Break the stored photo behind the pipeline's back, then re-run mining on a fresh photo set.
    concepts.delete_concept(svc, "alice", "mug")
    concepts.create_concept(svc, "alice", "mug", "Bobo")
    svc.task_queue = type(svc.task_queue)(synchronous=True)  # fresh queue, same behaviour
    svc.task_queue.bind(task_handlers(svc))
    record = svc.store.put_photo("alice", "mug", photo_of(BLUE, 1))
    manifest = concepts.get_concept(svc, "alice", "mug")
    svc.store.write_manifest(manifest.model_copy(update={"photos": [record]}))
    svc.store.objects.put(record.object_key, b"corrupted bytes")
    with pytest.raises(Exception, match="image"):  # PIL's UnidentifiedImageError
        pipeline.mine_concept(svc, "alice", "mug")
    failed = concepts.get_concept(svc, "alice", "mug")
    assert failed.state == "failed" and failed.failure_reason.startswith("mining failed")
    assert "Error" not in failed.failure_reason  # the exception class is in the log only
    # The user re-sends a good photo: the concept leaves `failed` and becomes ready.
    svc.store.objects.delete(record.object_key)
    svc.store.write_manifest(failed.model_copy(update={"photos": []}), check_objects=False)
    concepts.add_photos(svc, "alice", "mug", [photo_of(BLUE, 2)])
    assert concepts.get_concept(svc, "alice", "mug").state == "ready"


def test_store_outage_is_unavailable(service_settings, tiny):
    from personalkv.config import StorageSettings
    from personalkv.devstack.s3 import free_port
    from personalkv.bootstrap import bootstrap

    dead = f"s3://bucket?endpoint=127.0.0.1:{free_port()}&secure=false"
    settings = service_settings.model_copy(update={"storage": StorageSettings(
        url=dead, connect_timeout_s=0.2, read_timeout_s=0.5, retries=0)})
    from personalkv.service_layer.task_queue import InProcessTaskQueue

    services = bootstrap(settings, adapter=tiny("qwen2_vl"),
                         task_queue=InProcessTaskQueue(synchronous=True))
    try:
        with pytest.raises(Unavailable):
            concepts.create_concept(services, "alice", "mug", "Bobo")
    finally:
        services.close()


def test_closing_a_stream_early_stops_generation(svc):
    stream = answering.ask_stream(svc, "alice", "Tell me a long story", [],
                                  AskOptions(max_new_tokens=200, temperature=1.0, seed=1))
    first = next(stream)
    assert isinstance(first, str)
    stream.close()  # the generating thread stops at its next token


def test_recaching_with_a_new_model_replaces_every_chunk(svc, photo_of):
    from personalkv.models.tiny import tiny_model

    make_ready(svc, photo_of)
    old = concepts.get_concept(svc, "alice", "mug")
    svc.replace("adapter", tiny_model("qwen2_vl", seed=1))  # other weights: another fingerprint
    assert svc.adapter.fingerprint() != old.model_fingerprint
    pipeline.cache_concept(svc, "alice", "mug")
    new = concepts.get_concept(svc, "alice", "mug")
    assert new.state == "ready" and new.model_fingerprint == svc.adapter.fingerprint()
    assert len(new.chunks) == len(old.chunks)
    assert not {c.chunk_id for c in new.chunks} & {c.chunk_id for c in old.chunks}
    assert chunk_files(svc, "alice", "mug") == sorted(c.object_key for c in new.chunks)
    result = answering.ask(svc, "alice", "Where is Bobo?", [], AskOptions(max_new_tokens=2))
    assert result.concepts[0][0] == "mug" and result.personal_evidence_used


def test_mining_uses_only_the_same_users_other_concepts_as_negatives(svc, photo_of, monkeypatch):
    """Distinctiveness evidence: the user's other concepts' photos, round-robin and capped by
    ``mining.user_negatives``; never another user's, never the concept's own."""
    make_ready(svc, photo_of, concept="ball", name="Redball", colour=RED, n=3)
    make_ready(svc, photo_of, user="bob", concept="cup", name="Bobs", colour=(20, 160, 40), n=2)
    seen = {}
    real_mine = svc.miner

    def spy(manifest, photos, **kw):
        seen[manifest.concept_id] = kw
        return real_mine(manifest, photos, **kw)

    monkeypatch.setattr(svc, "miner", spy)
    monkeypatch.setattr(svc.settings.mining, "user_negatives", 2)
    make_ready(svc, photo_of, concept="mug", n=2)
    kw = seen["mug"]
    assert kw["context"] == {}  # a first mining has no earlier photos
    # ball's first two photos only (cap 2); bob's cup is another user's: never read
    assert [ref.load().tobytes() for ref in kw["negatives"]] == [
        decode(photo_of(RED, k)).tobytes() for k in range(2)]
    assert {ref.concept_id for ref in kw["negatives"]} == {"ball"}
    concepts.add_photos(svc, "alice", "mug", [photo_of(BLUE, 3)])
    assert len(seen["mug"]["context"]) == 2  # the two photos mined before: evidence, not re-mined
