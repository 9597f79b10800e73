"""Loading a user's KV chunks for placement: through the hot-chunk LRU (``svc.chunk_cache``),
verified against the model, the user and the chunk id (``kv.codec.decode_chunk``).

Called by the Ask path (the chunks retrieval picked) and by a conversation's rebuild (the chunks
its record names). A chunk that vanished (its concept deleted meanwhile) or fails verification
is reported, not raised: the Ask answers from the rest, a rebuild refuses (it must be exact).
Each such chunk is logged once per process (later Asks skip it quietly, still counted in
``skipped``): any caching run of its concept re-encodes it (``personalkv recache --user U``, or
an upload of a new photo), which gives it a working blob under the same key.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from personalkv.chunk_ref import ChunkRef
from personalkv.kv.chunk import KVChunk
from personalkv.kv.codec import ChunkFormatError, decode_chunk
from personalkv.service_layer._common import dependencies
from personalkv.service_layer.services import Services
from personalkv.storage.base import ObjectNotFound

log = logging.getLogger(__name__)

_reported: set[tuple[str, str, str]] = set()  # (user, concept, chunk) logged in this process
_reported_lock = threading.Lock()
_MAX_REPORTED = 100_000  # then forget them all: a bounded set, a line again per bad chunk


def _report_once(user_id: str, concept_id: str, chunk_id: str, problem: str) -> None:
    """Log a chunk that Ask had to skip, once per process: the first time as a warning that
    says what repairs it, later ones at debug level (every Ask would repeat the same line)."""
    key = (user_id, concept_id, chunk_id)
    with _reported_lock:
        first = key not in _reported
        if first:
            if len(_reported) >= _MAX_REPORTED:
                _reported.clear()
            _reported.add(key)
    log.log(logging.WARNING if first else logging.DEBUG,
            "chunk %s of %s/%s skipped: %s; `personalkv recache --user %s` (or uploading a new "
            "photo to the concept) re-encodes it", chunk_id[:12], user_id, concept_id, problem,
            user_id)


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
            _report_once(user_id, concept_id, ref.chunk_id, f"unusable ({exc})")
            continue
        out.cache_hits += hit
        out.chunks.append(chunk)
        out.refs.append((concept_id, ref))
    return out
