"""How one concept manifest becomes retrieval keys (``IndexEntry`` rows in two vector spaces).

Called by ``personalkv.retrieval.indexing`` (every manifest) and by the ingest path when a concept
turns ready; the retriever embeds its queries with the same encoders via ``KeyBuilder``.

Keys of a concept (all carry user, concept and model fingerprint):

* text space: one key per ``profile_text`` chunk, the embedding of the whole profile text,
  pointing at that chunk; one chunkless ``name`` key ("<name>, <category>") whose ``source``
  keeps the name, so the retriever can match names mentioned in a question.
* image space: one key per mined patch (the crop), pointing at the ``image_patch`` chunk whose
  ``source`` is that patch's index; one chunkless ``photo`` key per whole photo. An image chunk
  whose patch is unknown still gets a key (on the first photo) so placement can find it.

Key ids hash the user in (``user_scoped_digest``): identical photos or texts of two users give
different keys, so one user's upsert can never replace another's entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from personalkv.chunk_ref import ChunkRef
from personalkv.ids import user_scoped_digest
from personalkv.index.base import IndexEntry, VectorSpace
from personalkv.manifest import ConceptManifest
from personalkv.images import ImageLike, upright
from personalkv.retrieval.encoders import ImageEncoder, TextEncoder

NAME_PREFIX = "name:"


def profile_text(manifest: ConceptManifest) -> str:
    """The text a profile_text key embeds: everything the user and the VLM said about it."""
    p = manifest.profile
    parts = [p.name, p.category, p.info, p.caption, "; ".join(p.attributes)]
    return ". ".join(part.strip() for part in parts if part and part.strip())


def key_id(manifest: ConceptManifest, fingerprint: str, kind: str, ref: str) -> str:
    return user_scoped_digest(
        manifest.user_id, manifest.concept_id.encode(), fingerprint.encode(), kind.encode(),
        ref.encode(), domain="index-key",
    )


@dataclass
class ConceptKeys:
    text: list[IndexEntry]
    image: list[IndexEntry]


class KeyBuilder:
    """Turns manifests into entries with one text and one image encoder."""

    def __init__(self, text_encoder: TextEncoder, image_encoder: ImageEncoder):
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        self.text_space = VectorSpace(f"text_{text_encoder.name}", text_encoder.dim)
        self.image_space = VectorSpace(f"image_{image_encoder.name}", image_encoder.dim)

    def build(self, manifest: ConceptManifest,
              load_photo: Callable[[str], ImageLike]) -> ConceptKeys:
        """``load_photo(photo_id)`` gives a photo: its stored bytes (``ChunkStore.get_photo``)
        or, from a caller that decoded it already (the caching pipeline), its upright image."""
        fingerprint = manifest.model_fingerprint or ""
        return ConceptKeys(
            text=self._text_keys(manifest, fingerprint),
            image=self._image_keys(manifest, fingerprint, load_photo),
        )

    def _entry(self, m: ConceptManifest, fingerprint: str, kind: str, ref: str,
               vector: np.ndarray, chunk: ChunkRef | None = None,
               source: str = "") -> IndexEntry:
        return IndexEntry(
            key_id=key_id(m, fingerprint, kind, ref), user_id=m.user_id,
            concept_id=m.concept_id, kind=kind, vector=vector,
            model_fingerprint=chunk.model_fingerprint if chunk else fingerprint,
            source=chunk.source if chunk else source, chunk=chunk,
        )

    def _text_keys(self, m: ConceptManifest, fingerprint: str) -> list[IndexEntry]:
        name_text = f"{m.profile.name}, {m.profile.category}" if m.profile.category \
            else m.profile.name
        full_vec, name_vec = self.text_encoder.encode([profile_text(m), name_text])
        entries = [self._entry(m, fingerprint, "name", "name", name_vec,
                               source=NAME_PREFIX + m.profile.name)]
        for chunk in m.chunks:
            if chunk.kind == "profile_text":
                entries.append(self._entry(m, fingerprint, "profile_text", chunk.chunk_id,
                                           full_vec, chunk=chunk))
        return entries

    def _image_keys(self, m: ConceptManifest, fingerprint: str,
                    load_photo: Callable[[str], ImageLike]) -> list[IndexEntry]:
        photos = {p.photo_id: upright(load_photo(p.photo_id)) for p in m.photos}
        images, refs = [], []  # (kind, ref, chunk, source) per image
        for photo_id, image in photos.items():
            images.append(image)
            refs.append(("photo", photo_id, None, f"photo:{photo_id}"))
        chunks_by_patch = {c.source: c for c in m.chunks if c.kind == "image_patch"}
        for i, patch in enumerate(m.patches):
            images.append(photos[patch.photo_id].crop(patch.box))
            chunk = chunks_by_patch.pop(str(i), None)
            refs.append(("image_patch", f"patch:{i}", chunk, f"patch:{i}"))
        orphans = list(chunks_by_patch.values())
        if orphans and photos:
            first = next(iter(photos.values()))
            for chunk in orphans:
                images.append(first)
                refs.append(("image_patch", f"chunk:{chunk.chunk_id}", chunk, ""))
        if not images:
            return []
        vectors = self.image_encoder.encode(images)
        return [self._entry(m, fingerprint, kind, ref, vec, chunk=chunk, source=source)
                for (kind, ref, chunk, source), vec in zip(refs, vectors)]
