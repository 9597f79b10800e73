"""Incremental detokenization (``engine.detokenizer``): the streamed pieces concatenate to the
tokenizer's decode of the whole answer, on every tiny model's tokenizer and on SmolLM2's; no
piece shows half of a multi-byte character; each step decodes a window of a few tokens, not the
answer so far. Exact string equality: there is no tolerance in text."""

from __future__ import annotations

import random

import pytest

from personalkv.engine.detokenizer import IncrementalDetokenizer
from personalkv.models.tiny import KINDS
from tests.plugins.models import get_tiny

TEXTS = [
    "Bobo's mug is red, with a white star on its side.",
    "naïve café: 🐶 likes 日本語 and the € sign; “quotes” — dashes…",
    "  leading spaces,\nnew lines\tand tabs  ",
    "ünïcödé🙂🙂 emoji after emoji 🐈‍⬛",
]


def _stream(tokenizer, ids):
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.add(i) for i in ids]
    pieces.append(detokenizer.flush())
    return pieces


def _check(tokenizer, seed=0):
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        pieces = _stream(tokenizer, ids)
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
        assert not any("\ufffd" in p for p in pieces)  # never half a character
    rng = random.Random(seed)
    vocab = len(tokenizer)
    for _ in range(20):  # arbitrary ids (what a random-weight model emits), specials included
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        assert "".join(_stream(tokenizer, ids)) == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_pieces_equal_the_full_decode_tiny(kind):
    _check(get_tiny(kind).tokenizer)


@pytest.mark.slow
def test_streamed_pieces_equal_the_full_decode_smollm2():
    from personalkv.config import ModelSettings
    from personalkv.models import load_adapter

    _check(load_adapter("smollm2", settings=ModelSettings()).tokenizer)


class _CountingTokenizer:
    """A tokenizer that records how many ids each decode call was given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.sizes = tokenizer, []

    def decode(self, ids, **kwargs):
        self.sizes.append(len(ids))
        return self.tokenizer.decode(ids, **kwargs)


def test_each_token_decodes_a_short_window_not_the_whole_answer():
    counting = _CountingTokenizer(get_tiny(KINDS[0]).tokenizer)
    ids = counting.tokenizer.encode(" ".join(["word"] * 300), add_special_tokens=False)
    _stream(counting, ids)
    assert len(ids) >= 300
    assert max(counting.sizes) <= 8  # bounded by the window, not by the 300 tokens so far
