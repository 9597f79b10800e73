"""Loading a user's KV chunks for placement: through the hot-chunk LRU (``svc.chunk_cache``),
verified against the model, the user and the chunk id (``kv.codec.decode_chunk``).

Called by the Ask path (the chunks retrieval picked) and by a conversation's rebuild (the chunks
its record names). A chunk that vanished (its concept deleted meanwhile) or fails verification
is reported, not raised: the Ask answers from the rest, a rebuild refuses (it must be exact).
Each such chunk is logged once per process (later Asks skip it quietly, still counted in
``skipped``), and a chunk that fails verification gets its concept's caching run enqueued at
once (repair on sight): any caching run re-encodes it (as do ``personalkv recache --user U`` and
an upload of a new photo), which gives it a working blob under the same key.

``answerable`` keeps out, before any chunk is loaded, the concepts retrieval picked whose
manifest is damaged or gone: their chunks may still verify (and sit in the chunk cache), but
the concept's record, which says what it is and who owns it, does not; it is not answered from
until it is created again (``_common.DAMAGED_REASON``). A manifest read whole is trusted for
``MANIFEST_RECHECK_S`` in this process (an Ask costs no manifest GET while its concepts are
unchanged): damage done to a manifest behind the service's back is seen within that time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from cachetools import TTLCache

from personalkv.chunk_ref import ChunkRef
from personalkv.kv.chunk import KVChunk
from personalkv.kv.codec import ChunkFormatError, decode_chunk
from personalkv.manifest import ConceptManifest
from personalkv.service_layer._common import dependencies
from personalkv.service_layer.services import Services
from personalkv.storage.base import ObjectNotFound
from personalkv.storage.chunk_store import DamagedManifestError

log = logging.getLogger(__name__)

_reported: set[tuple[str, str, str]] = set()  # (user, concept, chunk) logged in this process
_reported_lock = threading.Lock()
_MAX_REPORTED = 100_000  # then forget them all: a bounded set, a line again per bad chunk


#: what the log line of a skipped chunk says repairs it
RECACHE_FIX = "`personalkv recache --user {user}` (or uploading a new photo to the concept) re-encodes it"


def _report_once(user_id: str, concept_id: str, item: str, problem: str, fix: str = RECACHE_FIX) -> bool:
    """Log something Ask had to skip (a chunk by its id, or "manifest"), once per process: the
    first time as a warning that says what repairs it, later ones at debug level (every Ask
    would repeat the same line). Returns whether this was the first time."""
    key = (user_id, concept_id, item)
    with _reported_lock:
        first = key not in _reported
        if first:
            if len(_reported) >= _MAX_REPORTED:
                _reported.clear()
            _reported.add(key)
    log.log(logging.WARNING if first else logging.DEBUG, "%s of %s/%s skipped: %s; %s",
            item if item == "manifest" else f"chunk {item[:12]}", user_id, concept_id, problem,
            fix.format(user=user_id))
    return first


def enqueue_repair(svc: Services, user_id: str, concept_id: str) -> None:
    """Repair on sight: a caching run of the concept re-encodes every chunk whose blob fails
    verification (``pipeline._ChunkWriter``). Best effort: the Ask goes on if the queue is down."""
    try:
        svc.task_queue.enqueue_caching(user_id, concept_id)
        log.info("repair of %s/%s enqueued (a chunk failed verification)", user_id, concept_id)
    except Exception:  # noqa: BLE001 - the Ask must not fail for its repair
        log.warning("could not enqueue the repair of %s/%s; `personalkv recache --user %s` "
                    "repairs it", user_id, concept_id, user_id, exc_info=True)


#: seconds a manifest that read whole is trusted without reading it again (module docstring)
MANIFEST_RECHECK_S = 30.0
#: (user, concept) whose manifest read whole within MANIFEST_RECHECK_S (the least recent
#: dropped beyond maxsize); a lock: cachetools' caches are not thread-safe
_verified: TTLCache[tuple[str, str], bool] = TTLCache(maxsize=100_000, ttl=MANIFEST_RECHECK_S,
                                                      timer=time.monotonic)
_verified_lock = threading.Lock()


def answerable(svc: Services, user_id: str, concept_ids: Iterable[str]) -> set[str]:
    """Those of ``concept_ids`` whose manifest reads (a GET each, unless read whole within
    ``MANIFEST_RECHECK_S``: retrieval picks a few)."""
    readable = set()
    for concept_id in dict.fromkeys(concept_ids):
        with _verified_lock:
            trusted = (user_id, concept_id) in _verified
        if trusted:
            readable.add(concept_id)
            continue
        try:
            with dependencies("the object store"):
                manifest = svc.store.read_manifest(user_id, concept_id)
        except DamagedManifestError:
            _report_once(user_id, concept_id, "manifest", "it is damaged",
                         "the concept is not answered from until it is deleted and created again")
            continue
        if manifest is not None:  # None: deleted since its keys were searched
            readable.add(concept_id)
            with _verified_lock:
                _verified[(user_id, concept_id)] = True
    return readable


def damaged_chunks(svc: Services, manifest: ConceptManifest) -> list[str]:
    """The ids of ``manifest``'s chunks whose blob is missing or fails verification (checksum,
    owner, id; no model needed: the ingestion server checks them when known photos are sent
    again)."""
    damaged = []
    for ref in manifest.chunks:
        try:
            with dependencies("the object store"):
                blob = svc.store.get_chunk_by_key(manifest.user_id, ref.object_key)
            decode_chunk(blob, expected_user=manifest.user_id, expected_chunk_id=ref.chunk_id)
        except (ObjectNotFound, ChunkFormatError):
            damaged.append(ref.chunk_id)
    return damaged


@dataclass
class LoadedChunks:
    chunks: list[KVChunk] = field(default_factory=list)
    #: (concept id, ref) of each loaded chunk, in the order given
    refs: list[tuple[str, ChunkRef]] = field(default_factory=list)
    skipped: int = 0
    cache_hits: int = 0


def load_chunks(svc: Services, user_id: str, wanted: Iterable[tuple[str, ChunkRef]]) -> LoadedChunks:
    """The chunks of ``wanted`` ((concept id, ref) pairs) that load and verify, in order."""
    adapter = svc.adapter
    fingerprint = adapter.fingerprint()
    out = LoadedChunks()
    to_repair: list[str] = []
    for concept_id, ref in wanted:
        def load(ref=ref) -> KVChunk:
            blob = svc.store.get_chunk_by_key(user_id, ref.object_key)
            return decode_chunk(blob, expected_model=fingerprint, dtype=adapter.dtype,
                                expected_user=user_id, expected_chunk_id=ref.chunk_id,
                                device=adapter.device)

        try:
            with dependencies("the object store"):
                chunk, hit = svc.chunk_cache.get_or_load((user_id, concept_id, ref.chunk_id), load)
        except ObjectNotFound:
            out.skipped += 1
            _report_once(user_id, concept_id, ref.chunk_id,
                         "its object is missing (unless the concept was deleted meanwhile)")
            continue
        except ChunkFormatError as exc:
            out.skipped += 1
            if _report_once(user_id, concept_id, ref.chunk_id, f"unusable ({exc})"):
                to_repair.append(concept_id)
            continue
        out.cache_hits += hit
        out.chunks.append(chunk)
        out.refs.append((concept_id, ref))
    for concept_id in dict.fromkeys(to_repair):  # after loading: this request uses what it has
        enqueue_repair(svc, user_id, concept_id)
    return out
