"""Tiny random-weight models (one per architecture, built once per session) and test photos."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from personalkv.models.tiny import KINDS, tiny_model

_CACHE: dict[str, object] = {}


def get_tiny(kind: str):
    if kind not in _CACHE:
        _CACHE[kind] = tiny_model(kind, seed=0)
    return _CACHE[kind]


@pytest.fixture(params=KINDS)
def any_adapter(request):
    return get_tiny(request.param)


@pytest.fixture
def tiny():
    """``tiny("qwen2_vl")`` -> the session's adapter of that kind."""
    return get_tiny


def make_photo(seed: int, size: tuple[int, int] = (96, 80)) -> Image.Image:
    """A deterministic random RGB photo (width, height)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8"))


@pytest.fixture
def photo():
    return make_photo
