"""`LocalObjectStore`: objects as files under one root directory (URL `file:///abs/dir`).

The embedded default for a single machine and the reference backend in tests. A key `a/b/c`
is the file `<root>/a/b/c`. Writes go to a hidden temp file in the same directory, are
fsynced, then `os.replace`d over the target, so readers see old or new bytes, never a torn
file. Keys are validated by `check_key` and the resolved path is re-checked to lie inside the
root, so neither `..` nor a symlink planted in the tree can make a key escape it.

Compare-and-set (`put_if`): the version of an object is the sha256 of its bytes; a conditional
write holds an exclusive `flock` on a lock file for the key (under `<root>/.locks/`, outside
every listing) while it compares and replaces, so writers in any process on this machine are
serialized. (flock is advisory and local: the directory must not be shared over NFS by
several machines; use S3 for that.)
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import secrets
from contextlib import contextmanager
from collections.abc import Iterator
from pathlib import Path

from personalkv.ids import InvalidIdError
from personalkv.storage.base import (
    ObjectNotFound,
    ObjectStore,
    StorageError,
    check_key,
    check_prefix,
    check_version,
)

_TMP_PREFIX = ".tmp-"  # check_key refuses segments starting with ".", so never a key
_LOCK_DIR = ".locks"  # likewise never a key, and list() skips dot directories


def _version(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class LocalObjectStore(ObjectStore):
    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = self.root.as_uri()
        self._fsync = fsync

    def _path(self, key: str, *, follow_last: bool = True) -> Path:
        path = self.root.joinpath(*check_key(key).split("/"))
        # Resolve symlinks (a missing tail is fine): a link planted inside the tree, to a
        # directory or a file, must not let a key read or write outside it. unlink does not
        # follow the last component, so delete only needs the parent checked.
        resolved = path.resolve() if follow_last else path.parent.resolve() / path.name
        if not resolved.is_relative_to(self.root):
            raise InvalidIdError(f"object key {key!r} resolves outside the store root")
        return path

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        path = self._path(key)
        for attempt in range(2):  # a concurrent delete may rmdir the parent under us once
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._write_atomically(path, data)
                return
            except FileNotFoundError:
                if attempt:
                    raise
            except (NotADirectoryError, IsADirectoryError, FileExistsError) as exc:
                raise StorageError(f"key {key!r} collides with a file/directory: {exc}") from exc

    def _write_atomically(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{secrets.token_hex(6)}")
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                if self._fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @contextmanager
    def _locked(self, key: str):
        locks = self.root / _LOCK_DIR
        locks.mkdir(exist_ok=True)
        # One lock file per key, named by its hash: keys may be longer than a file name.
        with open(locks / hashlib.sha256(key.encode()).hexdigest()[:40], "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        data = self.get(key)
        return data, _version(data)

    def put_if(self, key: str, data: bytes, version: str | None,
               content_type: str = "application/octet-stream") -> None:
        self._path(key)  # validate before taking the lock
        with self._locked(key):
            try:
                current = _version(self.get(key))
            except ObjectNotFound:
                current = None
            check_version(key, current, version, self.url)
            self.put(key, data, content_type)

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ObjectNotFound(f"no object {key!r} in {self.url}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        path = self._path(key, follow_last=False)
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError):
            return
        self._prune_empty_dirs(path.parent)

    def _prune_empty_dirs(self, directory: Path) -> None:
        # Keep the tree free of empty directories so list_children matches S3, where a
        # "directory" exists only while an object lies under it.
        while directory != self.root and directory.is_relative_to(self.root):
            try:
                directory.rmdir()
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                    return
                raise
            directory = directory.parent

    def _dir(self, prefix: str) -> Path:
        check_prefix(prefix)
        return self._path(prefix[:-1]) if prefix else self.root

    def list(self, prefix: str = "") -> Iterator[str]:
        base = self._dir(prefix)
        keys = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(self.root).as_posix()
            head = "" if rel == "." else rel + "/"
            keys.extend(
                head + name
                for name in filenames
                if not name.startswith(".") and not os.path.islink(os.path.join(dirpath, name))
            )
        yield from sorted(keys)

    def list_children(self, prefix: str = "") -> Iterator[str]:
        base = self._dir(prefix)
        try:
            entries = sorted(e.name for e in os.scandir(base) if e.is_dir() and e.name[0] != ".")
        except (FileNotFoundError, NotADirectoryError):
            return
        for name in entries:
            if next(self.list(f"{prefix}{name}/"), None) is not None:
                yield name
