"""Per-photo descriptors, computed once per photo and kept beside it in the user's prefix.

A photo's descriptors are what mining and recognition compute from its pixels: RootSIFT
keypoints (``LocalFeatures``), the candidate windows and their appearance embeddings
(``PhotoLibrary.describe``). They are by far the slowest part of both, and they depend only on
the photo and on a few settings, so they are stored content-addressed:

    users/<user>/concepts/<concept>/features/<photo id>.<tag>.npz

``photo id`` is the photo's content hash (user-scoped, see ``ChunkStore.put_photo``) and
``tag`` hashes the settings that shape them (extractor, embedder, max side, how windows are
embedded: ``window_scales`` / ``window_split``, and ``FORMAT_VERSION``). Deleting
the concept deletes them with its prefix; a settings change picks a new tag (old files are
ignored). The mining job of a new concept reads the user's other photos' descriptors instead of
re-describing them, and the answering process builds each user's recognizer from them
(``personalkv.mining.served``).

Descriptors and window embeddings are stored as float16 (half the bytes; RootSIFT values lie in
[0, 1] and embeddings are unit vectors). Freshly computed descriptors pass through the same
rounding before use, so a photo is scored the same whether it was described now or read back.
"""

from __future__ import annotations

import hashlib
import io
import logging

import numpy as np

from personalkv.config import MiningSettings
from personalkv.ids import validate_hex_digest
from personalkv.mining.features import LocalFeatures
from personalkv.storage.base import ObjectNotFound, ObjectStore
from personalkv.storage.chunk_store import ChunkStore

log = logging.getLogger(__name__)

#: The stored format. Pooled window appearance (issue 23, ``window_scales`` > 0) adds the
#: window settings to the tag; window crops (the default) keep the tag they always had, so an
#: upgrade does not describe every photo again for the same descriptors.
FORMAT_VERSION = 1

#: (shape (h, w), local features, candidate boxes, window appearance): PhotoLibrary's cache value
Described = tuple


def descriptor_tag(settings: MiningSettings) -> str:
    what = f"v{FORMAT_VERSION}|{settings.extractor}|{settings.embedder}|{settings.max_side}"
    if settings.window_scales:  # pooled windows: other appearance vectors, another tag
        what += f"|w{settings.window_scales}.{settings.window_split}"
    return hashlib.sha256(what.encode()).hexdigest()[:12]


def pack(described: Described) -> bytes:
    shape, local, boxes, appearance = described
    buf = io.BytesIO()
    np.savez(buf, shape=np.asarray(shape[:2], np.int64), xy=local.xy.astype(np.float32),
             size=local.size.astype(np.float32), desc=local.desc.astype(np.float16),
             boxes=np.asarray(boxes, np.float32), appearance=np.asarray(appearance, np.float16))
    return buf.getvalue()


def unpack(data: bytes) -> Described:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        local = LocalFeatures(z["xy"], z["size"], z["desc"].astype(np.float32))
        return (tuple(int(v) for v in z["shape"]), local, z["boxes"],
                z["appearance"].astype(np.float32))


def rounded(described: Described) -> Described:
    """``described`` as it reads back from storage (float16 rounding)."""
    return unpack(pack(described))


class DescriptorStore:
    """Reads and writes one user's photo descriptors (module doc) in an ObjectStore."""

    def __init__(self, objects: ObjectStore, settings: MiningSettings):
        self.objects = objects
        self.tag = descriptor_tag(settings)

    def key(self, user_id: str, concept_id: str, photo_id: str) -> str:
        photo_id = validate_hex_digest(photo_id, "photo id")
        return f"{ChunkStore.concept_prefix(user_id, concept_id)}features/{photo_id}.{self.tag}.npz"

    def get(self, user_id: str, concept_id: str, photo_id: str) -> Described | None:
        try:
            return unpack(self.objects.get(self.key(user_id, concept_id, photo_id)))
        except ObjectNotFound:
            return None
        except (ValueError, KeyError, OSError) as exc:  # unreadable: describe again, overwrite
            log.warning("descriptors of photo %s of %s/%s unreadable (%s)", photo_id[:12],
                        user_id, concept_id, exc)
            return None

    def cache_for(self, user_id: str, owners: dict[str, str], memo: dict | None = None) -> "StoredDescriptors":
        """A ``PhotoLibrary.cache`` over this user's stored descriptors; ``owners`` maps the
        photo ids that may be stored to their concept (other ids, e.g. generic negative-pool
        paths, are only memoised)."""
        return StoredDescriptors(self, user_id, owners, memo)


class StoredDescriptors:
    """Dict-like photo id -> described photo, backed by the object store (see module doc).
    Counts ``described`` (computed here) and ``loaded`` (read back) for the mining notes."""

    def __init__(self, store: DescriptorStore, user_id: str, owners: dict[str, str],
                 memo: dict | None = None):
        self.store, self.user_id, self.owners = store, user_id, dict(owners)
        self.memo = {} if memo is None else memo
        self.described = self.loaded = 0

    def __contains__(self, photo_id: str) -> bool:
        if photo_id in self.memo:
            return True
        concept = self.owners.get(photo_id)
        if concept is None:
            return False
        found = self.store.get(self.user_id, concept, photo_id)
        if found is None:
            return False
        self.memo[photo_id] = found
        self.loaded += 1
        return True

    def __getitem__(self, photo_id: str) -> Described:
        return self.memo[photo_id]

    def __setitem__(self, photo_id: str, described: Described) -> None:
        self.described += 1
        concept = self.owners.get(photo_id)
        if concept is None:
            self.memo[photo_id] = rounded(described)
            return
        data = pack(described)
        self.store.objects.put(self.store.key(self.user_id, concept, photo_id), data)
        self.memo[photo_id] = unpack(data)
