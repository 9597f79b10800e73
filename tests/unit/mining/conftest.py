"""Synthetic concept sets for the mining tests, served as fixtures.

Each concept is a plain-coloured object (nothing to recognise on it) carrying one planted,
distinctive textured mark, photographed on varied textured backgrounds; the negatives are the
same backgrounds without the object (so background features match the pool), and the concepts
share the backgrounds with each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import pytest

SIZE = 256
MARK = 48


@dataclass
class SynthPhoto:
    image: np.ndarray
    mark_box: tuple[int, int, int, int]
    object_box: tuple[int, int, int, int]


@dataclass
class SynthSet:
    concepts: dict[str, list[SynthPhoto]]
    negatives: list[np.ndarray]


def _background(rng: np.random.Generator) -> np.ndarray:
    img = np.full((SIZE, SIZE, 3), rng.integers(60, 200, 3), np.uint8)
    for _ in range(45):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = (int(v) for v in rng.integers(0, SIZE, 2))
        if rng.random() < 0.5:
            cv2.rectangle(img, (x, y), (x + int(rng.integers(6, 40)), y + int(rng.integers(6, 40))), colour, -1)
        else:
            cv2.circle(img, (x, y), int(rng.integers(3, 20)), colour, -1)
    return img


def _mark(rng: np.random.Generator) -> np.ndarray:
    cells = rng.integers(0, 2, (7, 7)).astype(np.uint8)
    mark = np.zeros((MARK, MARK, 3), np.uint8)
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    big = cv2.resize(cells, (MARK, MARK), interpolation=cv2.INTER_NEAREST)
    mark[big == 1] = a
    mark[big == 0] = b
    for _ in range(3):
        cv2.circle(mark, tuple(int(v) for v in rng.integers(8, MARK - 8, 2)), 5,
                   tuple(int(c) for c in rng.integers(0, 256, 3)), -1)
    return mark


def _place(bg: np.ndarray, colour, mark: np.ndarray, rng: np.random.Generator) -> SynthPhoto:
    img = bg.copy()
    ow, oh = int(rng.integers(90, 112)), int(rng.integers(104, 128))
    x0, y0 = int(rng.integers(10, SIZE - ow - 10)), int(rng.integers(10, SIZE - oh - 10))
    cv2.rectangle(img, (x0, y0), (x0 + ow, y0 + oh), colour, -1)
    mx, my = x0 + (ow - MARK) // 2, y0 + (oh - MARK) // 2
    img[my:my + MARK, mx:mx + MARK] = mark
    return SynthPhoto(img, (mx, my, mx + MARK, my + MARK), (x0, y0, x0 + ow, y0 + oh))


def make_set(n_concepts: int = 10, photos: int = 3, n_backgrounds: int = 8, seed: int = 0) -> SynthSet:
    rng = np.random.default_rng(seed)
    backgrounds = [_background(rng) for _ in range(n_backgrounds)]
    concepts = {}
    for c in range(n_concepts):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        mark = _mark(rng)
        picks = rng.choice(n_backgrounds, photos, replace=False)
        concepts[f"c{c}"] = [_place(backgrounds[i], colour, mark, rng) for i in picks]
    negatives = [np.roll(bg, int(rng.integers(-16, 16)), axis=1) for bg in backgrounds]
    return SynthSet(concepts, negatives)


def overlap(box, target) -> float:
    """Share of ``target`` covered by ``box``."""
    ix = max(0, min(box[2], target[2]) - max(box[0], target[0]))
    iy = max(0, min(box[3], target[3]) - max(box[1], target[1]))
    return ix * iy / ((target[2] - target[0]) * (target[3] - target[1]))


@pytest.fixture(scope="session")
def synth_set() -> SynthSet:
    return make_set()


@pytest.fixture(scope="session")
def synth_factory():
    return make_set


@pytest.fixture(scope="session")
def box_overlap():
    return overlap
