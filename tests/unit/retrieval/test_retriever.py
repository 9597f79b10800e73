"""Retriever with the real MiniLM encoder over the in-memory key index: what a question finds.

The same retriever over milvus-lite and the Milvus server runs in tests/integration/index
(test_isolation_property, test_reindex_and_delete); the in-memory index passes the same
contract tests as both (tests/unit/index/test_index_contract.py)."""

from __future__ import annotations

import pytest

from personalkv.config import RetrievalSettings
from personalkv.index import open_key_index
from personalkv.retrieval.indexing import index_concept
from personalkv.retrieval.encoders import get_image_encoder, get_text_encoder
from personalkv.retrieval.keys import KeyBuilder
from personalkv.retrieval.retriever import Retriever, names_in, query_crops
from tests.plugins.milvus import FINGERPRINT, build_concept, png, scene

CONCEPTS = [  # concept id, name, info, category, look
    ("bobo", "Bobo", "my golden retriever, he wears a red collar", "dog", 1),
    ("mug", "Blue mug", "my favourite coffee mug, a present from Anna", "mug", 2),
    ("speedy", "Speedy", "my road bike with a carbon frame", "bicycle", 3),
    ("fernie", "Fernie", "the fern on my kitchen windowsill", "plant", 4),
]


@pytest.fixture(scope="module")
def world():
    index = open_key_index("memory://")
    keys = KeyBuilder(get_text_encoder("minilm"), get_image_encoder("global"))
    for user in ("alice", "bob"):
        for cid, name, info, category, look in CONCEPTS:
            manifest, photos = build_concept(user, cid, name, info, look, category=category)
            index_concept(index, keys, manifest, photos.__getitem__)
    index.make_searchable()
    yield index, keys
    index.close()


@pytest.fixture
def retriever(world):
    return Retriever(*world, RetrievalSettings())


def ask(retriever, question, photo=None, user="alice", **kw):
    result = retriever.retrieve(user, question, photo, model_fingerprint=FINGERPRINT, **kw)
    return [c.concept_id for c in result.concepts], result


@pytest.mark.parametrize("question, expected", [
    ("What colour is Bobo's collar?", ["bobo"]),
    ("where did I leave my dog?", ["bobo"]),
    ("is my coffee cup in the dishwasher?", ["mug"]),
    ("Do Bobo and Speedy both fit in the car?", ["bobo", "speedy"]),
])
def test_text_questions(retriever, question, expected):
    found, _ = ask(retriever, question)
    assert sorted(found) == sorted(expected)


def test_a_question_about_nothing_of_theirs_finds_nothing(retriever):
    found, result = ask(retriever, "what's the weather in Paris tomorrow?")
    assert found == [] and result.none_matched and result.candidates


@pytest.mark.parametrize("cid, look", [(c[0], c[4]) for c in CONCEPTS])
def test_a_photo_finds_the_concept_the_question_does_not_name(retriever, cid, look):
    photo, _ = scene(look, 4242 + look)  # a new scene, the object elsewhere in it
    found, result = ask(retriever, "what is this?", png(photo) if look % 2 else photo)
    assert found[:1] == [cid]
    assert result.concepts[0].image_score > result.concepts[0].text_score


def test_chunks_come_with_records_in_placement_order(retriever):
    _, result = ask(retriever, "Tell me about Bobo")
    (bobo,) = result.concepts
    assert [c.kind for c in bobo.chunks] == ["profile_text", "image_patch", "image_patch"]
    assert [c.source for c in bobo.chunks] == ["profile", "0", "1"]
    assert all(c.object_key.startswith("users/alice/concepts/bobo/chunks/") for c in bobo.chunks)
    assert all(c.token_count == 10 and c.model_fingerprint == FINGERPRINT for c in bobo.chunks)
    assert result.chunks() == list(bobo.chunks)


def test_other_fingerprint_and_unknown_user_find_nothing(retriever):
    assert retriever.retrieve("alice", "Bobo?", model_fingerprint="other").none_matched
    assert ask(retriever, "Bobo?", user="carol")[0] == []


def test_top_k_and_threshold(world):
    strict = Retriever(*world, RetrievalSettings(threshold=5.0))
    assert ask(strict, "Bobo and Speedy")[0] == []
    assert len(ask(Retriever(*world, RetrievalSettings()), "Bobo and Speedy and Fernie", top_k=2)[0]) == 2


def test_visual_reranker_replaces_image_scores(world):
    calls = []

    def rerank(user_id, photo, candidates):
        calls.append((user_id, sorted(candidates)))
        return {"fernie": 1.0, "bobo": 0.0, "not-mine": 1.0}

    photo, _ = scene(1, 999)  # shows Bobo; the re-ranker insists on Fernie
    found, _ = ask(Retriever(*world, RetrievalSettings(), visual_reranker=rerank), "what is this?", photo)
    assert found == ["fernie"] and calls[0][0] == "alice"


def test_every_concept_the_reranker_accepts_passes_the_relative_cut(world):
    """Two things in one photo: the weaker one is kept when the re-ranker accepted it on its own
    evidence (score >= threshold), however far below the best it scored; a concept it did not
    accept still falls under the relative cut."""
    settings = RetrievalSettings()  # threshold 0.45, relative cut 0.6 of the best
    weak = settings.threshold + 0.02  # accepted, but far under 0.6 x 1.0

    def rerank(user_id, photo, candidates):
        return {"fernie": 1.0, "mug": weak, "speedy": settings.threshold - 0.02}

    photo, _ = scene(None, 7)
    found, _ = ask(Retriever(*world, settings, visual_reranker=rerank), "what are these?", photo)
    assert found == ["fernie", "mug"]
    assert weak < settings.relative_cut * 1.0  # mug passed only because it was verified


def test_names_in_matches_whole_words_only():
    names = {"bobo": "Bobo", "mug": "Blue mug", "x": "a"}
    assert names_in("Is BOBO's blue mug clean?", names) == {"bobo", "mug"}
    assert names_in("Bobonator", names) == set()


def test_query_crops_cover_the_photo():
    photo, _ = scene(None, 1)
    crops = query_crops(photo)
    assert crops[0] is photo and len(crops) > 20
