"""What a chunk holds, before encoding: the framing of every kind of evidence, in one place.

A chunk is *of* a piece of evidence: a concept's profile (as a few clean sentences) or one
mined image patch (framed by a short text naming the concept). ``Evidence`` carries what goes
into the chunk id (``content``, hashed with the model, framing and owner) and how to build what
the model reads (``parts``). The caching pipeline, the QA evaluation and the tests all frame
evidence here, so the chunk a worker stores and the chunk an evaluation encodes are the same.
Running the model over it is ``personalkv.kv.engine.encode``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from PIL import Image

from personalkv.kv.chunk import ChunkKind, chunk_content_hash
from personalkv.manifest import ConceptProfile
from personalkv.models.base import ModelAdapter


@dataclass(frozen=True)
class Evidence:
    """One piece of evidence before encoding: what the chunk is *of* (``content``, hashed into
    the chunk id) and how to build what the model reads (``parts``, called only when the chunk
    is really encoded, so a caller can skip the vision tower for chunks it already stores)."""

    kind: ChunkKind
    content: bytes
    source: str
    parts: Callable[[ModelAdapter], list]


def profile_evidence(text: str) -> Evidence:
    """A concept's text profile: the text is the whole evidence and its content."""
    text = text.rstrip("\n") + "\n"
    return Evidence(kind="profile_text", content=text.encode(), source="profile", parts=lambda _: [text])


def profile_chunk_evidence(profile: ConceptProfile) -> Evidence:
    """What a concept's profile chunk holds: its profile as a few clean sentences. The caching
    pipeline stores exactly this and the QA evaluation (personalkv.evaluation.qa) encodes it."""
    return profile_evidence(profile_sentences(profile))


def patch_evidence(image: Image.Image, concept_name: str, source: str = "") -> Evidence:
    """One mined image patch, framed by a short text naming the concept. Its content is the
    framing, the size and the raw RGB pixels: independent of any image encoder's output."""
    framing = f"A photo detail of my {concept_name}: "
    rgb = image.convert("RGB")
    width, height = rgb.size
    content = framing.encode() + b"\0" + f"{width}x{height}".encode() + b"\0" + rgb.tobytes()
    return Evidence(
        kind="image_patch", content=content, source=source,
        parts=lambda adapter: [framing, adapter.encode_image(rgb), "\n"],
    )


def evidence_chunk_id(adapter: ModelAdapter, evidence: Evidence, *, user_id: str, concept_id: str) -> str:
    """The id the chunk will have, known without running the model."""
    return chunk_id_of(adapter, user_id, concept_id, evidence.kind, evidence.content)


def chunk_id_of(adapter: ModelAdapter, user_id: str, concept_id: str, kind: str, content: bytes) -> str:
    """The content hash of ``content`` encoded by ``adapter`` for this owner: the chunk id."""
    return chunk_content_hash(
        model_fingerprint=adapter.fingerprint(), framing=adapter.system_prefix().framing,
        user_id=user_id, concept_id=concept_id, kind=kind, content=content,
    )


def profile_sentences(profile: ConceptProfile) -> str:
    """The profile as the short text a chunk holds (the Jarvis paper's prefix from the profile
    JSON): who it is, what the user wrote, the VLM's caption when there is one, and the
    distinctive details, e.g. "Rex is my dog. He loves the park. Distinctive details: collar
    (black leather), ears (floppy brown)." Each fact once: a caption built from the user's facts
    repeats them and is left out; ``part: descriptor`` lines of the user's text become details."""
    name = " ".join(profile.name.split())
    category = " ".join(profile.category.split())
    sentences = [f"{name} is my {category}." if category else f"{name} is one of my things."]
    attributes = list(profile.attributes)
    for line in profile.info.splitlines():
        kept = [p.strip() for p in line.split(";") if p.strip() and p.strip().lower() not in attributes]
        sentences.append(_sentence("; ".join(kept)))
    if profile.source == "vlm" and profile.caption.strip():
        sentences.append(_sentence(profile.caption))
    details = [a.split(":", 1) for a in attributes]
    if details:
        listed = ", ".join(f"{part.strip()} ({descriptor.strip()})" for part, descriptor in details)
        sentences.append(f"Distinctive details: {listed}.")
    return " ".join(s for s in sentences if s)


def _sentence(text: str) -> str:
    """One clean sentence: whitespace collapsed, dangling separators dropped, a final period."""
    text = " ".join(text.split()).strip(" ,;:-")
    if text and text[-1] not in ".!?":
        text += "."
    return text
