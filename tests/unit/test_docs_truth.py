"""What the docs name exists (issue 31): every `make` target they tell a reader to run is a
target of the Makefile, and every PERSONALKV_* variable they mention is a setting (config.py)
or one deploy/compose.yaml reads (its image names). The CHANGELOG is history and is not
checked."""

from __future__ import annotations

import pathlib
import re

import pytest

from personalkv.config import Settings

ROOT = pathlib.Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "deploy" / "README.md"]

def _settings_variables() -> set[str]:
    names = set(re.findall(r"\$\{(PERSONALKV_[A-Z0-9_]+)", (ROOT / "deploy" / "compose.yaml").read_text()))
    for section in Settings.model_fields.values():
        cls = section.default_factory
        prefix = cls.model_config.get("env_prefix", "")
        names |= {f"{prefix}{name}".upper() for name in cls.model_fields}
    return names


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", text, re.M))


@pytest.mark.parametrize("page", [p for p in PAGES if p.exists()], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_make_target_the_docs_name_exists(page):
    targets = _make_targets()
    assert {"demo", "test", "bench"} <= targets  # the parse found the Makefile's targets
    named = set(re.findall(r"`make ([a-z][\w-]*)", page.read_text()))
    assert named <= targets, f"{page.name} names make targets the Makefile lacks: {sorted(named - targets)}"


@pytest.mark.parametrize("page", [p for p in PAGES if p.exists()], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_personalkv_variable_the_docs_name_is_read(page):
    known = _settings_variables()
    named = set(re.findall(r"\bPERSONALKV_[A-Z0-9_]*[A-Z0-9]\b", page.read_text()))
    unknown = {n for n in named if n not in known
               and not any(k.startswith(n + "_") for k in known)}  # a prefix naming a family
    assert not unknown, f"{page.name} names variables nothing reads: {sorted(unknown)}"
