"""PhotoLibrary: the keypoint index and the matching rule shared by mining and recognition."""

from __future__ import annotations

import cv2
import numpy as np

from personalkv.mining.features import ColourEmbedder, SiftExtractor
from personalkv.mining.library import PhotoLibrary


def _matches(library: PhotoLibrary, query) -> list[tuple[int, tuple[int, ...], tuple[int, ...]]]:
    return [(m.photo, tuple(m.query_idx), tuple(m.photo_idx)) for m in library.match(query)]


def test_the_same_photos_give_the_same_matches_whatever_ran_before(synth_factory):
    """The kd-trees are randomised from OpenCV's RNG, which any cv2 call moves: two libraries of
    the same photos, built after different draws, must still match a query alike (before the
    fix the neighbours, and so the mined patches of a photo and its twin, differed by run)."""
    data = synth_factory(n_concepts=3, photos=3, n_backgrounds=4, seed=3)
    extractor = SiftExtractor()
    query = extractor.extract(data.concepts["c0"][0].image)
    results = []
    for draws in (1, 7):
        cv2.randu(np.zeros(draws), 0, 1)  # move the RNG as unrelated code would
        library = PhotoLibrary(extractor, ColourEmbedder())
        for cid, shots in data.concepts.items():
            library.add_concept(cid, [s.image for s in shots[1:]])
        library.add_negatives(data.negatives)
        library.build()
        results.append(_matches(library, query))
    assert results[0] and results[0] == results[1]
