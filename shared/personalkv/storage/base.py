"""The `ObjectStore` interface: bytes under `/`-separated string keys.

Who calls it: only `ChunkStore` (tenant layout) and the devstack/benchmarks; services never
build keys themselves. Backends: `local.LocalObjectStore` (a directory, the embedded default
and the reference implementation in tests), `s3.S3ObjectStore` (S3/MinIO via `minio`) and
`memory.InMemoryObjectStore` (a dict, for fast tests). All must behave identically;
tests/integration/storage runs one contract suite over all three.

Guarantees every backend gives:
  * `put` is atomic: a reader sees the old bytes or the new bytes, never a mix or a prefix.
  * `delete` and `delete_prefix` are idempotent (deleting what is gone is not an error).
  * `list` yields keys in lexicographic order.
  * An unreachable backend raises `StorageUnavailable` quickly, never hangs.
  * `put_if` is a compare-and-set: it replaces the object only if it is still the version
    `get_versioned` returned (or, with version None, only if there is none), else raises
    `PreconditionFailed`; two writers that read the same version never both succeed. S3: a
    conditional PUT (If-Match on the ETag / If-None-Match: *); local: a per-key lock file;
    memory: one lock.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator

from personalkv.ids import InvalidIdError

MAX_KEY_BYTES = 1024  # S3's limit
# A segment never starts with "." so ".", ".." and our temp files (".tmp-*") are not keys.
_SEGMENT_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


class StorageError(Exception):
    """Base class of storage failures."""


class ObjectNotFound(StorageError, KeyError):
    """`get` of a key that does not exist."""

    def __str__(self) -> str:  # KeyError would print the repr of the args
        return str(self.args[0]) if self.args else "object not found"


class PreconditionFailed(StorageError):
    """`put_if` lost a race: the object changed (or appeared, or vanished) since it was read."""


class StorageUnavailable(StorageError):
    """The backend cannot be reached or answered with a server error; safe to retry later."""


def check_key(key: str) -> str:
    """Return `key` if it is a safe relative key (`a/b/c.ext`), else raise InvalidIdError."""
    if not isinstance(key, str) or not key:
        raise InvalidIdError(f"object key must be a non-empty string, got {key!r}")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise InvalidIdError(f"object key is longer than {MAX_KEY_BYTES} bytes")
    for segment in key.split("/"):
        if not segment.isascii() or _SEGMENT_RE.fullmatch(segment) is None:
            raise InvalidIdError(f"object key {key!r} has an invalid segment {segment!r}")
    return key


def check_version(key: str, current: str | None, expected: str | None, where: str) -> None:
    """The precondition of `put_if` for backends that compare versions themselves (local,
    memory), answered as S3 answers a conditional PUT: `current` is the object's version now
    (None: no object), `expected` the one the writer read (None: create only)."""
    if current is None and expected is not None:
        raise ObjectNotFound(f"no object {key!r} in {where}")
    if current != expected:
        state = "already exists" if expected is None else "changed since it was read"
        raise PreconditionFailed(f"object {key!r} {state}")


def check_prefix(prefix: str) -> str:
    """A listing prefix is "" (everything) or a valid key followed by "/"."""
    if prefix == "":
        return prefix
    if not isinstance(prefix, str) or not prefix.endswith("/"):
        raise InvalidIdError(f"prefix {prefix!r} must be empty or end with '/'")
    check_key(prefix[:-1])
    return prefix


class ObjectStore(ABC):
    """Bytes under keys. Keys are checked with `check_key` by every method."""

    #: The URL this store was opened from (no secrets in it), for logs and errors.
    url: str = ""

    @abstractmethod
    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Store `data` under `key` atomically, replacing what was there."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """Return the bytes under `key`; raise `ObjectNotFound` if there are none."""

    @abstractmethod
    def get_versioned(self, key: str) -> tuple[bytes, str]:
        """(bytes, version) of `key`; the version is opaque, for `put_if`. ObjectNotFound if
        there is no object."""

    @abstractmethod
    def put_if(self, key: str, data: bytes, version: str | None,
               content_type: str = "application/octet-stream") -> None:
        """Store `data` under `key` only if its current version is `version` (None: only if
        there is no object yet); else raise PreconditionFailed. Atomic like `put`."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether `key` holds an object."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key`; no error if it is already gone."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Yield every key under `prefix` (recursively), in lexicographic order."""

    @abstractmethod
    def list_children(self, prefix: str = "") -> Iterator[str]:
        """Yield the names of the immediate "sub-directories" under `prefix` (S3 CommonPrefixes),
        sorted; e.g. list_children("users/") yields user ids without listing their objects."""

    def delete_prefix(self, prefix: str) -> int:
        """Remove every key under `prefix`; return how many were removed. Idempotent.

        The empty prefix is refused: wiping a whole store is never what a caller means.
        """
        if check_prefix(prefix) == "":
            raise InvalidIdError("delete_prefix refuses the empty prefix")
        count = 0
        for key in list(self.list(prefix)):
            self.delete(key)
            count += 1
        return count

    def close(self) -> None:
        """Release connections; the default has none."""

    def __enter__(self) -> ObjectStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
