"""The README stays a short entry point: under 10 KB, every link alive, and a newcomer finds the
two commands, the Ask path, where chunks are stored and how to configure a real VLM in it or
one link away (docs/)."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
CHECKED = [README, ROOT / "CHANGELOG.md", *DOCS]
MAX_README_BYTES = 10 * 1024

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def _prose(text: str) -> str:
    """The text outside fenced code blocks (a Mermaid diagram or a shell session has no links)."""
    return FENCE.sub("", text)


def _links(path: pathlib.Path) -> list[str]:
    return LINK.findall(_prose(path.read_text()))


def _relative(link: str) -> bool:
    return not re.match(r"^[a-z][a-z0-9+.-]*:", link, re.I) and not link.startswith("//")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def _anchors(path: pathlib.Path) -> set[str]:
    return {_slug(h) for h in HEADING.findall(_prose(path.read_text()))}


def _target(page: pathlib.Path, link: str) -> tuple[pathlib.Path, str]:
    file, _, anchor = link.partition("#")
    return (page.parent / file).resolve() if file else page, anchor


def test_readme_is_at_most_10_kb():
    size = len(README.read_bytes())
    assert size <= MAX_README_BYTES, f"README.md is {size} bytes; move depth into docs/"


@pytest.mark.parametrize("page", CHECKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for link in filter(_relative, _links(page)):
        target, anchor = _target(page, link)
        if not target.exists():
            broken.append(f"{link}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(f"{link}: no heading with that anchor in {target.name}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_docs_pages_exist_and_open_with_contents():
    names = {p.name for p in DOCS}
    assert {"architecture.md", "operations.md", "configuration.md", "evaluation.md"} <= names
    for page in DOCS:
        head = "\n".join(page.read_text().splitlines()[:15])
        assert "Contents" in head and "](#" in head, f"{page.name} starts without a table of contents"


def test_readme_links_every_docs_page_and_the_other_guides():
    linked = {_target(README, link)[0] for link in filter(_relative, _links(README))}
    expected = [*DOCS, ROOT / "CHANGELOG.md", ROOT / "deploy" / "README.md",
                ROOT / "shared" / "personalkv" / "mining" / "README.md"]
    missing = [str(p.relative_to(ROOT)) for p in expected if p.resolve() not in linked]
    assert not missing, f"README.md does not link {missing}"


def test_readme_names_the_two_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text


def _readme_and_one_link_away() -> str:
    """The README and every local Markdown page it links: what a newcomer reads in one click."""
    pages = {README.resolve()}
    for link in filter(_relative, _links(README)):
        target, _ = _target(README, link)
        if target.suffix == ".md" and target.exists():
            pages.add(target)
    return "\n".join(p.read_text() for p in sorted(pages))


@pytest.mark.parametrize("topic, needles", [
    ("the Ask path", ["retrieve", "load", "place", "prefill", "decode", "## The Ask path"]),
    ("where chunks are stored", ["users/<user>/concepts/<concept>", "chunks/<chunk id>.kv",
                                 "PERSONALKV_STORAGE_URL"]),
    ("how to configure a real VLM", ["PERSONALKV_MODEL_NAME", "Qwen/Qwen2-VL-2B-Instruct",
                                     "smollm2"]),
])
def test_a_newcomer_finds_it_within_one_link(topic, needles):
    text = _readme_and_one_link_away()
    missing = [n for n in needles if n not in text]
    assert not missing, f"{topic}: neither README.md nor a page it links says {missing}"
