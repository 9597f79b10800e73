"""The recognizer in Ask: per-photo descriptors stored once beside the photo (and deleted with
it), each user's recognizer built once per process from them and rebuilt when the user's mined
concepts change, the mining seam's notes and failures in the manifest."""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image
import io

from personalkv.service_layer import answering, concepts, mining_port


def _photo(concept: int, shot: int) -> bytes:
    """Concept ``concept``'s textured mark (96 px) at a shot-dependent place on random clutter."""
    rng = np.random.default_rng(1000 * concept + shot)
    img = np.full((240, 320, 3), rng.integers(80, 180, 3), np.uint8)
    for _ in range(30):
        x, y = (int(v) for v in rng.integers(0, 320, 2))
        cv2.circle(img, (x, y), int(rng.integers(4, 18)), tuple(int(c) for c in rng.integers(0, 256, 3)), -1)
    mark = cv2.resize(np.random.default_rng(concept).integers(0, 256, (8, 8, 3)).astype(np.uint8),
                      (96, 96), interpolation=cv2.INTER_NEAREST)
    y, x = int(rng.integers(10, 130)), int(rng.integers(10, 210))
    img[y:y + 96, x:x + 96] = mark
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _ingest(svc, concept: int, n: int = 2, user: str = "alice"):
    cid = f"thing{concept}"
    concepts.create_concept(svc, user, cid, f"Thing{concept}", "toy")
    concepts.add_photos(svc, user, cid, [_photo(concept, k) for k in range(n)])
    m = concepts.get_concept(svc, user, cid)
    assert m.state == "ready"
    return m


def _features(svc, user: str, cid: str) -> list[str]:
    return sorted(k for k in svc.store.objects.list(f"users/{user}/concepts/{cid}/features/"))


def test_descriptors_are_stored_once_and_reused_by_mining_and_ask(svc):
    first = _ingest(svc, 0)
    assert first.mining_notes["miner"] == "personalkv.mining"
    assert first.mining_notes["photos_described"] == 2 and first.mining_notes["descriptors_loaded"] == 0
    assert len(_features(svc, "alice", "thing0")) == 2  # one per photo, beside it
    assert first.support and {p.photo_id for p in first.support} == {p.photo_id for p in first.photos}
    second = _ingest(svc, 1)
    # the new concept's own photos are described; the other concept's are read back, not redone
    assert second.mining_notes["photos_described"] == 2 and second.mining_notes["descriptors_loaded"] == 2
    assert second.mining_notes["negative_photos"] == 2

    rec = svc.recognizers
    result = answering.retrieve(svc, "alice", "What is this?", [_photo(1, 7)])
    assert result.concepts[0].concept_id == "thing1"
    assert rec.builds == 1
    state = rec.state("alice")
    assert sorted(state.recognizer.library.concept_ids) == ["thing0", "thing1"]
    answering.retrieve(svc, "alice", "What is this?", [_photo(0, 7)])
    assert rec.builds == 1  # nothing changed: the same recognizer serves the next Ask

    third = _ingest(svc, 2)
    assert third.mining_notes["descriptors_loaded"] == 4
    result = answering.retrieve(svc, "alice", "What is this?", [_photo(2, 7)])
    assert result.concepts[0].concept_id == "thing2" and rec.builds == 2  # rebuilt once

    concepts.delete_concept(svc, "alice", "thing2")
    assert _features(svc, "alice", "thing2") == []  # deleted with the concept
    result = answering.retrieve(svc, "alice", "What is this?", [_photo(2, 8)])
    assert "thing2" not in [c.concept_id for c in result.candidates]
    assert rec.builds == 3 and sorted(rec.state("alice").recognizer.library.concept_ids) == ["thing0", "thing1"]


def test_users_recognizers_are_separate(svc):
    _ingest(svc, 0, user="alice")
    _ingest(svc, 1, user="bob")
    for user, theirs in (("alice", "thing0"), ("bob", "thing1")):
        result = answering.retrieve(svc, user, "What is this?", [_photo(0 if user == "bob" else 1, 9)])
        assert {c.concept_id for c in result.candidates} <= {theirs}
        assert svc.recognizers.state(user).recognizer.library.concept_ids == [theirs]


def test_a_miner_failure_is_recorded_in_the_manifest(svc, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("miner exploded")

    monkeypatch.setattr(mining_port.mining, "mine_for_service", broken)
    m = _ingest(svc, 0)
    assert m.mining_notes == {"miner": "centre_crops", "miner_error": "RuntimeError: miner exploded"}
    assert m.patches and all("centre_prior" in p.scores for p in m.patches)


def test_the_miner_uses_the_process_adapter_and_its_notes_reach_the_manifest(svc):
    m = _ingest(svc, 0)
    # the tiny model's description fails the profile schema: facts, and the notes say so
    assert m.mining_notes["profile_source"] == m.profile.source == "user_facts"
    assert svc.is_built("adapter")  # the pipeline handed the miner this process's adapter


def test_descriptors_of_another_version_are_described_again_not_mixed(svc, monkeypatch):
    from personalkv.mining import descriptors as descriptors_module
    from personalkv.mining.descriptors import DescriptorStore, descriptor_tag
    from personalkv.mining.served import ServedRecognizers

    m = _ingest(svc, 0)
    shipped = svc.settings.mining
    stored = _features(svc, "alice", "thing0")
    assert len(stored) == 2 and all(f".{descriptor_tag(shipped)}." in k for k in stored)
    # the window appearance (crops vs pooled) and the format version are part of the tag
    other_way = 1 if shipped.window_scales == 0 else 0  # crops <-> windows from the photo's map
    crops = shipped.model_copy(update={"window_scales": other_way})
    assert descriptor_tag(crops) != descriptor_tag(shipped)
    split = shipped.model_copy(update={"window_scales": 1, "window_split": 8})
    assert descriptor_tag(split) != descriptor_tag(split.model_copy(update={"window_split": 16}))
    with monkeypatch.context() as mp:
        mp.setattr(descriptors_module, "FORMAT_VERSION", descriptors_module.FORMAT_VERSION - 1)
        assert descriptor_tag(shipped) not in stored[0]

    other = DescriptorStore(svc.store.objects, crops)
    assert all(other.get("alice", "thing0", p.photo_id) is None for p in m.photos)  # never read
    served = ServedRecognizers(svc.store, other, crops)
    library = served.state("alice").recognizer.library
    # described again under their own tag, beside (not over) the other version's files
    now = _features(svc, "alice", "thing0")
    assert len(now) == 4 and set(stored) < set(now)
    again = served._build("alice", served._manifests("alice"), "v", {})  # a fresh process
    fresh = {p.photo_id: p.appearance for p in library.photos}
    assert all(np.array_equal(fresh[p.photo_id], p.appearance) for p in again.recognizer.library.photos)


def test_recognition_stops_between_views_once_the_call_ends(svc, monkeypatch):
    """Issue 30: a photo Ask whose caller goes away (or whose deadline passes) while its photo is
    recognized stops at the next view (``personalkv.cancellation``) instead of finishing every
    tile and zoom view for nobody."""
    import pytest

    from personalkv.errors import CallEnded
    from personalkv.mining.recognizer import ConceptRecognizer
    from personalkv.service_layer.answering import AskOptions, CallLimits

    _ingest(svc, 0)
    views, real = [], ConceptRecognizer._view_evidence

    def counted(self, image, seconds):
        views.append(image.shape)
        return real(self, image, seconds)

    monkeypatch.setattr(ConceptRecognizer, "_view_evidence", counted)
    wide = Image.new("RGB", (600, 100), (200, 60, 30))  # a strip: the whole photo and 6 tiles
    buf = io.BytesIO()
    wide.save(buf, "PNG")
    answering.ask(svc, "alice", "Is this mine?", [buf.getvalue()], AskOptions(max_new_tokens=2))
    assert len(views) >= 3  # the whole photo and its tiles (and zoom views when none is accepted)
    views.clear()
    with pytest.raises(CallEnded, match="caller went away"):
        answering.ask(svc, "alice", "Is this mine?", [buf.getvalue()], AskOptions(max_new_tokens=2),
                      call=CallLimits(cancelled=lambda: len(views) >= 1))
    assert len(views) == 1  # stopped before the second view
