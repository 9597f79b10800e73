"""Writing a concept's retrieval keys into the index: one concept (``index_concept``, the ingest
path when a concept turns ready) or every concept again from the manifests alone (``reindex``:
the index is derived data).

Callers: the caching pipeline (``index_concept``), ``personalkv reindex`` (operators after an
encoder change, a lost Milvus volume or a migration) and the tests that prove a rebuilt index
answers like the one it replaced. It lives in ``retrieval`` because it builds keys
(``retrieval.keys``) and only writes them through the ``KeyIndex`` interface; ``index`` knows
nothing of concepts.

``reindex`` drops this index's collections and inserts every key again, so searches see an
empty or partial index while it runs; run it in a maintenance window, or into a fresh
``collection_prefix`` and switch the services' setting afterwards.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from personalkv.images import ImageLike
from personalkv.index.base import KeyIndex
from personalkv.manifest import ConceptManifest
from personalkv.retrieval.keys import ConceptKeys, KeyBuilder

INDEXED_STATES = ("ready",)  # a concept becomes findable when its chunks are all written


@dataclass
class ReindexReport:
    users: int = 0
    concepts: int = 0
    skipped: int = 0
    text_keys: int = 0
    image_keys: int = 0
    chunks: int = 0
    seconds: float = 0.0
    #: dropping/creating collections and the final flush + index build: fixed costs that do
    #: not grow with the number of concepts (seconds, included in ``seconds``)
    setup_seconds: float = 0.0
    finalize_seconds: float = 0.0


def index_concept(index: KeyIndex, keys: KeyBuilder, manifest: ConceptManifest,
                  load_photo: Callable[[str], ImageLike], visible_timeout_s: float = 30.0,
                  ) -> ConceptKeys:
    """(Re)index one concept: drop its old keys (a re-mined concept may have fewer patches),
    then upsert the new ones, and return only once every client (the answering server is
    another process) sees them (``KeyIndex.wait_visible``), so the caller may then publish the
    concept as ready. A crash between the steps leaves the concept unfindable until the retry;
    ``KeysNotVisible`` after ``visible_timeout_s`` is a ``TimeoutError`` (retried). Idempotent."""
    built = keys.build(manifest, load_photo)
    index.delete_concept(manifest.user_id, manifest.concept_id)
    for space, entries in ((keys.text_space, built.text), (keys.image_space, built.image)):
        index.upsert(space, entries)
    index.wait_visible(manifest.user_id, [e.key_id for e in built.text + built.image],
                       timeout_s=visible_timeout_s)
    return built


def reindex(store, index: KeyIndex, keys: KeyBuilder, *, users: Iterable[str] | None = None,
            batch: int = 2000, progress: Callable[[str], None] | None = None,
            progress_every_s: float = 5.0) -> ReindexReport:
    """Drop and rebuild the index from ``store`` (a ``ChunkStore``). With ``users``, rebuild only
    those users' keys and leave the rest of the index as is."""
    progress = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    started = last = time.perf_counter()
    report = ReindexReport()
    user_ids = list(users) if users is not None else None
    if user_ids is None:
        index.drop_all()
        user_ids = store.list_users()
    else:
        for user_id in user_ids:
            index.delete_user(user_id)
    for space in (keys.text_space, keys.image_space):
        index.ensure_space(space)
    report.setup_seconds = time.perf_counter() - started
    text, image = [], []

    def flush() -> None:
        # ``insert``, not upsert: the collections are empty of these users, and insert skips
        # the per-row delete that upsert costs.
        index.insert(keys.text_space, text), index.insert(keys.image_space, image)
        text.clear(), image.clear()

    for user_id in user_ids:
        report.users += 1
        for manifest in store.read_manifests(user_id):  # a damaged one is logged and skipped
            if manifest.state not in INDEXED_STATES:
                report.skipped += 1
                continue
            built = keys.build(manifest, lambda pid, concept_id=manifest.concept_id:
                               store.get_photo(user_id, concept_id, pid))
            text += built.text
            image += built.image
            report.concepts += 1
            report.text_keys += len(built.text)
            report.image_keys += len(built.image)
            report.chunks += len(manifest.chunks)
            if len(text) + len(image) >= batch:
                flush()
            now = time.perf_counter()
            if now - last >= progress_every_s:
                last = now
                progress(f"reindex: {report.users} users, {report.concepts} concepts, "
                         f"{report.text_keys + report.image_keys} keys, "
                         f"{report.concepts / (now - started):.1f} concepts/s")
    flush()
    finalize = time.perf_counter()
    index.make_searchable()
    report.seconds = time.perf_counter() - started
    report.finalize_seconds = report.seconds - (finalize - started)
    progress(f"reindex done: {report.users} users, {report.concepts} concepts "
             f"({report.skipped} not ready), {report.text_keys} text + {report.image_keys} "
             f"image keys in {report.seconds:.1f}s")
    return report
