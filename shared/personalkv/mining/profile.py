"""Concept profiles: name, category, a caption of at most 25 words and ``part: descriptor``
fingerprint attributes, built from the user's facts and the VLM's own description.

``ProfileWriter(generate)`` takes any ``generate(prompt, images) -> str`` callable (the VLM
adapter in personalkv.models; nothing leaves the machine). Its output must be JSON that passes
:func:`validate_profile_json`; otherwise (always, for the tiny random-weight models) the profile
is built from the user's facts alone and ``source`` says ``"user_facts"``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable, Sequence

from personalkv.manifest import ConceptProfile

MAX_CAPTION_WORDS = 25
MAX_ATTRIBUTES = 8
ATTRIBUTE_RE = re.compile(r"^[a-z][a-z0-9 \-]{0,30}: [^:\n]{1,60}$")

Generate = Callable[[str, Sequence], str]

PROMPT = (
    "You see photos of one personal item called {name} ({category}). {info}\n"
    "Reply with JSON only, exactly this schema:\n"
    '{{"caption": "<at most 25 words>", "attributes": ["<part>: <descriptor>", ...]}}\n'
    "Attributes are up to 8 distinctive visible details, e.g. \"collar: black leather\"."
)


class ProfileValidationError(ValueError):
    pass


def validate_profile_json(text: str) -> tuple[str, list[str]]:
    """(caption, attributes) from the model's reply, or ProfileValidationError."""
    match = re.search(r"\{.*\}", text or "", re.S)
    if not match:
        raise ProfileValidationError("no JSON object in the reply")
    try:
        data = json.loads(match.group(0))
    except json.JSONDecodeError as err:
        raise ProfileValidationError(f"invalid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ProfileValidationError("reply is not a JSON object")
    caption, attrs = data.get("caption"), data.get("attributes", [])
    if not isinstance(caption, str) or not caption.strip():
        raise ProfileValidationError("caption missing")
    if len(caption.split()) > MAX_CAPTION_WORDS:
        raise ProfileValidationError(f"caption longer than {MAX_CAPTION_WORDS} words")
    if not isinstance(attrs, list) or len(attrs) > MAX_ATTRIBUTES:
        raise ProfileValidationError("attributes must be a list of at most 8 items")
    clean = []
    for a in attrs:
        if not isinstance(a, str) or not ATTRIBUTE_RE.match(a.strip().lower()):
            raise ProfileValidationError(f"attribute {a!r} is not 'part: descriptor'")
        clean.append(a.strip().lower())
    return " ".join(caption.split()), clean


def caption_from_facts(name: str, category: str, info: str) -> str:
    words = info.split()
    if words:
        return " ".join(words[:MAX_CAPTION_WORDS])
    return f"{name}, {'a ' + category if category else 'a personal item'}"


def attributes_from_facts(info: str) -> list[str]:
    """``part: descriptor`` items the user wrote themselves (one per line or ';'-separated)."""
    items = [s.strip().lower() for s in re.split(r"[;\n]", info)]
    return [s for s in items if ATTRIBUTE_RE.match(s)][:MAX_ATTRIBUTES]


def vlm_generate(adapter, max_new_tokens: int = 160) -> Generate:
    """``generate(prompt, images)`` by the answering VLM itself (greedy, no personal chunks):
    the first photo goes in as the question's image. Nothing leaves the machine."""

    def generate(prompt: str, images: Sequence) -> str:
        from personalkv.kv.engine import GenerationOptions, answer

        image = images[0] if images else None
        return answer(adapter, [], prompt, image, GenerationOptions(max_new_tokens=max_new_tokens)).text

    return generate


@dataclass
class ProfileWriter:
    generate: Generate | None = None

    def write(self, name: str, category: str = "", info: str = "", images: Sequence = ()) -> ConceptProfile:
        if self.generate is not None:
            prompt = PROMPT.format(name=name, category=category or "object", info=info)
            try:
                caption, attrs = validate_profile_json(self.generate(prompt, list(images)))
                return ConceptProfile(name=name, category=category, info=info, caption=caption,
                                      attributes=attrs, source="vlm")
            except ProfileValidationError:
                pass
        return ConceptProfile(name=name, category=category, info=info,
                              caption=caption_from_facts(name, category, info),
                              attributes=attributes_from_facts(info), source="user_facts")
