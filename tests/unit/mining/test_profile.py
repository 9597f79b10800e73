"""Profiles: the VLM's JSON is used only when it validates; otherwise the user's facts."""

from __future__ import annotations

import json

import pytest

from personalkv.mining.profile import ProfileValidationError, ProfileWriter, validate_profile_json

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
