"""What one Ask with a photo costs in decodes and object-store reads: the photo is decoded once
(validation's decode is the only one; the retriever, the recognizer and the model take its
image), and the user's manifests are read only when their concepts changed (the recognizer
checks the user's concepts stamp, one small object)."""

from __future__ import annotations

from PIL import Image

from personalkv.service_layer import answering, concepts
from tests.unit.service_layer.test_recognizer_in_ask import _ingest, _photo


class _Counting:
    """Counts Image.open calls and the object-store GETs of manifests and stamps."""

    def __init__(self, svc, monkeypatch):
        self.opens = 0
        self.keys: list[str] = []
        real_open, objects = Image.open, svc.store.objects
        real_get, real_get_versioned = objects.get, objects.get_versioned

        def counting_open(*args, **kwargs):
            self.opens += 1
            return real_open(*args, **kwargs)

        def get(key, *args, **kwargs):
            self.keys.append(key)
            return real_get(key, *args, **kwargs)

        def get_versioned(key, *args, **kwargs):
            self.keys.append(key)
            return real_get_versioned(key, *args, **kwargs)

        monkeypatch.setattr(Image, "open", counting_open)
        monkeypatch.setattr(objects, "get", get)
        monkeypatch.setattr(objects, "get_versioned", get_versioned)

    def reset(self) -> None:
        self.opens, self.keys = 0, []

    @property
    def manifest_reads(self) -> int:
        return sum(key.endswith("/manifest.json") for key in self.keys)

    @property
    def stamp_reads(self) -> int:
        return sum(key.startswith("stamps/") for key in self.keys)


def test_an_ask_with_a_photo_decodes_it_once_and_reads_no_manifest_when_nothing_changed(
        svc, monkeypatch):
    for concept in range(2):
        _ingest(svc, concept)
    photo = _photo(0, 7)
    answering.ask(svc, "alice", "What is this?", [photo])  # builds the recognizer (reads all)
    count = _Counting(svc, monkeypatch)

    result = answering.ask(svc, "alice", "What is this?", [photo])
    assert result.concepts and result.concepts[0].concept_id == "thing0"
    assert count.opens == 1  # validation's decode; nothing decodes the photo again
    assert count.manifest_reads == 0 and count.stamp_reads == 1

    # A stream validates once too.
    count.reset()
    pieces = list(answering.ask_stream(svc, "alice", "What is this?", [photo]))
    assert isinstance(pieces[-1], answering.AskResult)
    assert count.opens == 1 and count.manifest_reads == 0


def test_a_changed_concept_is_seen_by_the_next_ask(svc, monkeypatch):
    _ingest(svc, 0)
    answering.ask(svc, "alice", "What is this?", [_photo(0, 7)])
    count = _Counting(svc, monkeypatch)
    _ingest(svc, 1)  # a new concept: its manifests change the stamp
    count.reset()
    result = answering.retrieve(svc, "alice", "What is this?", [_photo(1, 7)])
    assert count.manifest_reads >= 2  # the stamp changed: every manifest read again
    assert result.concepts and result.concepts[0].concept_id == "thing1"
    assert svc.recognizers.state("alice").recognizer.library.concept_ids == ["thing0", "thing1"]
    # A deleted concept is gone from the next Ask's recognizer.
    concepts.delete_concept(svc, "alice", "thing1")
    assert svc.recognizers.state("alice").recognizer.library.concept_ids == ["thing0"]


def test_a_lease_renewal_leaves_the_stamp_alone(svc):
    m = _ingest(svc, 0)
    before = svc.store.concepts_stamp("alice")
    assert before is not None
    svc.store.update_manifest("alice", m.concept_id,
                              lambda fresh: fresh.model_copy(update={"lease_until": None,
                                                                     "state": "caching"}))
    changed = svc.store.concepts_stamp("alice")
    assert changed != before  # a state change is a change
    from personalkv.service_layer.reconciler import lease_from_now

    svc.store.update_manifest("alice", m.concept_id,
                              lambda fresh: fresh.model_copy(update={"lease_until": lease_from_now(60)}))
    assert svc.store.concepts_stamp("alice") == changed  # the lease alone: no change


def test_recognizers_keep_the_most_recently_used_users(svc):
    from personalkv.mining.served import ServedRecognizers

    for user in ("alice", "bob", "carol"):
        _ingest(svc, 0, user=user)
    served = ServedRecognizers(svc.store, svc.descriptors, svc.settings.mining, max_users=2)
    for user in ("alice", "bob", "alice", "carol"):  # bob is the least recently used
        served.state(user)
    assert served.builds == 3 and sorted(served._states) == ["alice", "carol"]
    served.state("alice")  # kept: no rebuild
    assert served.builds == 3
