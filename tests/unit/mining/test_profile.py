"""Profiles: the VLM's JSON is used only when it validates; otherwise the user's facts."""

from __future__ import annotations

import json

import pytest

from personalkv.mining.profile import (PROMPT, ProfileValidationError, ProfileWriter, validate_profile_json,
                                       vlm_generate)

GOOD = {"caption": "A small red ceramic piggy bank with a white snout.",
        "attributes": ["snout: white ceramic", "ears: painted gold"]}


def test_valid_vlm_reply_is_used_and_recorded():
    seen = {}

    def generate(prompt, images):
        seen["prompt"], seen["images"] = prompt, images
        return "Sure! " + json.dumps(GOOD)

    prof = ProfileWriter(generate).write("piggy", "piggy bank", "My red piggy bank.", ["img"])
    assert prof.source == "vlm" and prof.attributes == GOOD["attributes"]
    assert "piggy" in seen["prompt"] and seen["images"] == ["img"]


@pytest.mark.parametrize("reply", [
    "no json here",
    '{"caption": "' + "word " * 26 + '", "attributes": []}',
    '{"caption": "ok", "attributes": ["no colon here"]}',
    '{"caption": "ok", "attributes": "collar: black"}',
    '{"attributes": []}',
    "\x00\x01 random tokens {",
])
def test_invalid_reply_falls_back_to_user_facts(reply):
    with pytest.raises(ProfileValidationError):
        validate_profile_json(reply)
    prof = ProfileWriter(lambda p, i: reply).write("bo", "dog", "A shiba inu. collar: black leather")
    assert prof.source == "user_facts"
    assert prof.caption == "A shiba inu. collar: black leather"


def test_facts_alone_give_caption_and_attributes():
    prof = ProfileWriter().write("bo", "dog", "collar: black leather; tail: curled")
    assert prof.source == "user_facts"
    assert prof.attributes == ["collar: black leather", "tail: curled"]
    assert len(prof.caption.split()) <= 25
    long = ProfileWriter().write("bo", "", "word " * 40)
    assert len(long.caption.split()) == 25
    assert ProfileWriter().write("bo", "", "").caption == "bo, a personal item"


@pytest.mark.parametrize("kind", ["qwen2_vl", "llava_onevision"])
def test_the_vlm_describes_the_photo_and_random_weights_fall_back_to_facts(tiny, photo, kind):
    """The real path: the adapter generates from the prompt and the first photo; a random-weight
    model's text never passes the schema, so the facts are used and the profile says so."""
    adapter = tiny(kind)
    generate = vlm_generate(adapter, max_new_tokens=12)
    replies = []

    def recording(prompt, images):
        replies.append(generate(prompt, images))
        return replies[-1]

    info = "collar: black leather; ears: floppy"
    profile = ProfileWriter(recording).write("Bo", "dog", info, [photo(1), photo(2)])
    assert len(replies) == 1 and isinstance(replies[0], str)
    assert replies[0] == generate(PROMPT.format(name="Bo", category="dog", info=info), [photo(1)])  # deterministic
    assert profile.source == "user_facts" and profile.attributes == ["collar: black leather", "ears: floppy"]
