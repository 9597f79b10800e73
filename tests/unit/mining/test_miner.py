"""The planted mark must be among each concept's top patches, above every background patch."""

from __future__ import annotations

import pytest

from personalkv.config import MiningSettings
from personalkv.mining.miner import Miner, build_library

# Slow tier (`make test-fast` skips it): the subject is mining quality (real extractors).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["efficientnet-lite0", "colour"])
def mined(request, synth_set):
    """Both offline embedders: the default CNN and the weights-free colour windows."""
    settings = MiningSettings(top_k=8, embedder=request.param)
    photos = {cid: [p.image for p in ps] for cid, ps in synth_set.concepts.items()}
    library = build_library(settings, photos, synth_set.negatives)
    miner = Miner(library, settings)
    return {cid: miner.mine(cid, photos[cid]) for cid in photos}


def _is_mark(patch, photos, overlap) -> bool:
    photo = photos[patch.photo_index]
    return overlap(patch.box, photo.mark_box) >= 0.5


def _is_background(patch, photos, overlap) -> bool:
    return overlap(photos[patch.photo_index].object_box, patch.box) == 0.0 or overlap(
        patch.box, photos[patch.photo_index].object_box) == 0.0


def test_mark_in_top3_for_90_percent_of_concepts(synth_set, mined, box_overlap):
    hits = 0
    for cid, concept in mined.items():
        photos = synth_set.concepts[cid]
        hits += any(_is_mark(p, photos, box_overlap) for p in concept.patches[:3])
    assert hits / len(mined) >= 0.9


def test_no_background_patch_above_the_mark(synth_set, mined, box_overlap):
    for cid, concept in mined.items():
        photos = synth_set.concepts[cid]
        ranks = [i for i, p in enumerate(concept.patches) if _is_mark(p, photos, box_overlap)]
        if not ranks:
            continue  # counted by the top-3 test
        above = concept.patches[: ranks[0]]
        assert not any(_is_background(p, photos, box_overlap) for p in above), cid


def test_patches_are_ranked_and_scored(mined):
    for concept in mined.values():
        scores = [p.score for p in concept.patches]
        assert scores == sorted(scores, reverse=True)
        assert len(concept.patches) == 8
        for p in concept.patches:
            assert {"subject", "consistency", "distinct", "appearance_margin"} <= set(p.scores)
            x0, y0, x1, y1 = p.box
            assert 0 <= x0 < x1 and 0 <= y0 < y1


def test_patch_records_match_the_manifest_schema(mined):
    concept = next(iter(mined.values()))
    for p in concept.patches:
        p.photo_id = "ab" * 32
    records = concept.patch_records()
    assert records[0].box == concept.patches[0].box
    assert records[0].scores["distinct"] == concept.patches[0].scores["distinct"]
