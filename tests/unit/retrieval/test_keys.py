"""How a manifest becomes index entries."""

from __future__ import annotations

from personalkv.retrieval.encoders import GlobalDescriptorEncoder, HashingTextEncoder
from personalkv.retrieval.keys import NAME_PREFIX, KeyBuilder, profile_text
from tests.plugins.milvus import build_concept

KEYS = KeyBuilder(HashingTextEncoder(), GlobalDescriptorEncoder())


def test_every_chunk_gets_one_key_and_names_are_kept():
    manifest, photos = build_concept("alice", "bobo", "Bobo", "my dog", 1, n_photos=3)
    built = KEYS.build(manifest, photos.__getitem__)
    chunk_keys = [e for e in built.text + built.image if e.chunk]
    assert [e.chunk for e in sorted(chunk_keys, key=lambda e: e.chunk.chunk_id)] == \
        sorted(manifest.chunks, key=lambda c: c.chunk_id)  # the manifest's ChunkRefs
    assert [e.source for e in built.text if e.kind == "name"] == [NAME_PREFIX + "Bobo"]
    assert sum(e.kind == "photo" for e in built.image) == 3
    for patch_index in range(3):  # patch i's crop key leads to the chunk whose source is i
        (e,) = [e for e in built.image if e.kind == "image_patch" and e.source == str(patch_index)]
        assert e.chunk and e.chunk.object_key.startswith("users/alice/concepts/bobo/chunks/")
    assert all(e.model_fingerprint == manifest.model_fingerprint for e in built.text + built.image)
    assert len({e.key_id for e in built.text + built.image}) == len(built.text + built.image)


def test_identical_content_of_two_users_never_shares_a_key():
    a = KEYS.build(*_build("alice"))
    b = KEYS.build(*_build("bob"))
    ids_a = {e.key_id for e in a.text + a.image}
    ids_b = {e.key_id for e in b.text + b.image}
    assert not ids_a & ids_b
    assert (a.text[0].vector == b.text[0].vector).all()  # same text, same vector, other key


def test_profile_text_joins_what_is_known():
    manifest, _ = build_concept("u", "c", "Bobo", "likes walks", 0, n_photos=0, category="dog")
    assert profile_text(manifest) == "Bobo. dog. likes walks"


def _build(user):
    manifest, photos = build_concept(user, "mug", "Mug", "blue", 2)
    return manifest, photos.__getitem__
