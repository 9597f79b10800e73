"""The profile text a concept's KV chunk holds reads as clean sentences, each fact once."""

from __future__ import annotations

import re

from personalkv.manifest import ConceptProfile
from personalkv.kv.evidence import profile_sentences
from personalkv.mining.profile import ProfileWriter


def test_user_facts_profile_reads_as_sentences_without_repeats():
    profile = ProfileWriter().write(
        "bo", "dog", "<bo> is a well-groomed Shiba Inu with a cinnamon coat and a black collar.")
    text = profile_sentences(profile)
    assert text == "bo is my dog. <bo> is a well-groomed Shiba Inu with a cinnamon coat and a black collar."
    # The caption built from the facts repeats them: it is left out, not said twice.
    assert text.count("Shiba Inu") == 1


def test_attributes_become_one_details_sentence_and_leave_the_free_text():
    profile = ProfileWriter().write("Rex", "dog", "He loves the park\ncollar: black leather; ears: floppy brown")
    assert profile.attributes == ["collar: black leather", "ears: floppy brown"]
    assert profile_sentences(profile) == (
        "Rex is my dog. He loves the park. Distinctive details: collar (black leather), ears (floppy brown).")


def test_vlm_caption_is_kept_and_nothing_is_doubled_or_dangling():
    profile = ConceptProfile(name="Bobo", category="mug", info="A gift from Anna;  ", caption="A blue mug,",
                             attributes=["logo: red star"], source="vlm")
    text = profile_sentences(profile)
    assert text == "Bobo is my mug. A gift from Anna. A blue mug. Distinctive details: logo (red star)."
    assert not re.search(r"\.\s*\.|[,;:]\.|\s{2}", text)
    assert profile_sentences(ConceptProfile(name="x")) == "x is one of my things."
