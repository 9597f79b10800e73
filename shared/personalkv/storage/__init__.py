"""Object storage: the system of record for photos, KV chunk blobs and concept manifests.

Two layers:
  base.ObjectStore      bytes under string keys; one small file per backend, chosen by URL
                        scheme in factory.open_object_store ("file://", "s3://")
  chunk_store.ChunkStore  the tenant-scoped layout (users/<user>/concepts/<concept>/...) that
                        the rest of PersonalKV calls; it never lets an unchecked id into a key
"""

from personalkv.storage.base import (
    ObjectNotFound,
    ObjectStore,
    StorageError,
    StorageUnavailable,
)
from personalkv.storage.chunk_store import ChunkStore, InvalidPhotoError, MissingObjectsError
from personalkv.storage.factory import open_object_store

__all__ = [
    "ChunkStore",
    "InvalidPhotoError",
    "MissingObjectsError",
    "ObjectNotFound",
    "ObjectStore",
    "StorageError",
    "StorageUnavailable",
    "open_object_store",
]
