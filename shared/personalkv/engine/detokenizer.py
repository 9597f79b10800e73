"""Incremental detokenization: the text each new token adds, in O(1) tokens of work per token.

Decoding the whole answer again for every token (what streaming did before) is quadratic in the
answer's length. Here, as in vLLM and TGI, each step decodes only a short window: the tokens
from ``prefix_offset`` (a few tokens before the ones not yet shown) to the end, and the same
window without the new tokens; the new text is the difference. Decoding a window, not one
token, keeps what depends on neighbours right (SentencePiece's leading space, byte-level BPE
pieces that merge into one character). A window whose text ends in U+FFFD holds half of a
multi-byte character: nothing is shown until its other bytes arrive (``flush`` shows whatever
is left when the answer ends).
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Feed token ids one at a time (``add``); the pieces it returns concatenate to the
    tokenizer's decode of all of them (``skip_special_tokens``)."""

    def __init__(self, tokenizer, *, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.tokens: list[int] = []
        self.prefix_offset = 0  # the window's start: tokens before it are final
        self.read_offset = 0  # tokens before it are shown
        self.text = ""  # everything shown so far

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """The text ``token_id`` completes ("" while a character or word is incomplete)."""
        self.tokens.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """What is left to show once no more tokens come (an incomplete character included)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        shown = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        window = self._decode(self.tokens[self.prefix_offset:])
        if len(window) <= len(shown) or (window.endswith(REPLACEMENT) and not final):
            return ""
        piece = window[len(shown):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        self.text += piece
        return piece
