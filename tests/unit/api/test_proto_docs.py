"""The proto comments state limits a client relies on; check each against the settings' defaults
and the code that enforces it, so that a changed limit makes the comment fail here."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from personalkv.config import RetrievalSettings, ServiceSettings, Settings
from personalkv.service_layer.answering import AskOptions, _check
from personalkv.errors import InvalidArgument

PROTOS = Path(__file__).resolve().parents[3] / "protos" / "personalkv" / "v1"


def _comment_of(proto: str, field: str) -> str:
    """The comment lines right above `field` in `proto` (joined)."""
    lines = (PROTOS / proto).read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(rf"\s*(optional |repeated )?[\w.]+ {field} = \d+;", line):
            j = i
            while j > 0 and lines[j - 1].strip().startswith("//"):
                j -= 1
            return " ".join(l.strip().lstrip("/").strip() for l in lines[j:i])
    raise AssertionError(f"no field {field} in {proto}")


def _number(text: str, pattern: str) -> float:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in {text!r}"
    return float(match.group(1).replace(",", ""))


def _svc():
    return SimpleNamespace(settings=Settings())


def test_question_limit_is_the_setting_and_is_enforced():
    limit = ServiceSettings().max_question_chars
    assert _number(_comment_of("answering.proto", "question"), r"default ([\d,]+)") == limit
    _check(_svc(), "alice", "x" * limit, [], AskOptions())
    with pytest.raises(InvalidArgument, match="limit"):
        _check(_svc(), "alice", "x" * (limit + 1), [], AskOptions())


def test_score_range_allows_the_name_bonus():
    doc = _comment_of("answering.proto", "score")  # UsedConcept.score (the first one)
    upper = _number(doc, r"in \[0, ([\d.]+)\] at the defaults")
    retrieval = RetrievalSettings()
    assert retrieval.weight_text <= 1 and retrieval.weight_image <= 1  # noisy-OR stays in [0, 1]
    assert upper == pytest.approx(1 + retrieval.weight_name)


@pytest.mark.parametrize("field,pattern,default", [
    ("max_new_tokens", r"default (\d+)", ServiceSettings().max_new_tokens),
    ("photos", r"default (\d+)", ServiceSettings().max_ask_photos),
])
def test_documented_defaults_match_the_settings(field, pattern, default):
    assert _number(_comment_of("answering.proto", field), pattern) == default


def test_top_k_and_temperature_ranges_are_the_enforced_ones():
    top = _number(_comment_of("answering.proto", "top_k"), r"1\.\.(\d+)")
    _check(_svc(), "alice", "q", [], AskOptions(top_k=int(top)))
    with pytest.raises(InvalidArgument):
        _check(_svc(), "alice", "q", [], AskOptions(top_k=int(top) + 1))
    hot = _number(_comment_of("answering.proto", "temperature"), r"0\.\.(\d+)")
    _check(_svc(), "alice", "q", [], AskOptions(temperature=hot))
    with pytest.raises(InvalidArgument):
        _check(_svc(), "alice", "q", [], AskOptions(temperature=hot + 0.01))


def test_photo_formats_named_in_the_protos_are_the_accepted_ones():
    from personalkv.service_layer.photos import ACCEPTED

    common = _comment_of("common.proto", "data")  # Photo.data's message comment is above it
    message_doc = (PROTOS / "common.proto").read_text().split("message Photo")[0].rsplit("\n\n", 1)[-1]
    for fmt in ACCEPTED:
        name = {"WEBP": "WebP"}.get(fmt, fmt)
        assert name in message_doc, (fmt, message_doc)
    assert "TIFF" in message_doc and "TIFF" not in ACCEPTED
    assert "Pillow decodes" not in message_doc + common
