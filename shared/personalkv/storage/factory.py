"""`open_object_store(url)`: pick the ObjectStore backend by URL scheme.

Called once per process by the service bootstrap (and by tests/benchmarks) with
`Settings.storage.url` and the settings themselves (never read here). Backends are imported lazily so a local-directory deployment never
imports `minio`. Secrets never travel in the URL: S3 keys come from `StorageSettings`.

  file:///abs/dir, file://./rel/dir, /abs/dir, rel/dir   -> LocalObjectStore
  s3://BUCKET[/PREFIX]?endpoint=HOST:PORT&secure=false&region=R
                                                          -> S3ObjectStore (objects under
                                                             PREFIX/ in the bucket)
  memory://                                               -> InMemoryObjectStore (a new,
                                                             empty store each time; tests)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

from personalkv.config import StorageSettings
from personalkv.storage.base import ObjectStore


def _open_file(url: str, settings: StorageSettings | None) -> ObjectStore:
    local = importlib.import_module("personalkv.storage.local")
    if "://" not in url:
        return local.LocalObjectStore(url)
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise ValueError(f"file URL {url!r} takes no query or fragment")
    # file:///abs -> "/abs"; file://./rel and file://../rel -> relative to the working dir.
    host = "" if parts.netloc in ("", "localhost") else parts.netloc
    if host not in ("", ".", ".."):
        raise ValueError(f"file URL {url!r} names a host; use file:///abs/path or file://./rel")
    return local.LocalObjectStore(host + parts.path)


def _flag(value: str, name: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={value!r} is not a boolean")


def _open_s3(url: str, settings: StorageSettings | None) -> ObjectStore:
    if settings is None:
        raise ValueError(f"{url!r}: an s3:// store needs the StorageSettings (keys, timeouts)")
    s3 = importlib.import_module("personalkv.storage.s3")
    parts = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(parts.query, strict_parsing=bool(parts.query)).items()}
    unknown = set(query) - {"endpoint", "secure", "region"}
    if unknown:
        raise ValueError(f"s3 URL {url!r}: unknown parameter(s) {sorted(unknown)}")
    if "endpoint" not in query:
        raise ValueError(f"s3 URL {url!r} needs ?endpoint=HOST:PORT")
    secret = settings.secret_key.get_secret_value() if settings.secret_key else None
    return s3.S3ObjectStore(
        parts.netloc,
        query["endpoint"],
        settings.access_key,
        secret,
        secure=_flag(query.get("secure", "false"), "secure"),
        region=query.get("region", settings.region),
        connect_timeout_s=settings.connect_timeout_s,
        read_timeout_s=settings.read_timeout_s,
        retries=settings.retries,
        ca_file=settings.ca_file,
        prefix=parts.path,
    )


def _open_memory(url: str, settings: StorageSettings | None) -> ObjectStore:
    if url != "memory://":
        raise ValueError(f"memory URL {url!r} takes no name, path or query: use memory://")
    return importlib.import_module("personalkv.storage.memory").InMemoryObjectStore(url)


BACKENDS: dict[str, Callable[[str, StorageSettings | None], ObjectStore]] = {
    "file": _open_file,
    "s3": _open_s3,
    "memory": _open_memory,
}


def open_object_store(
    url: str | None = None, settings: StorageSettings | None = None
) -> ObjectStore:
    """Open the store at `url` (default: `settings.url`). `settings` are the process's storage
    settings, passed down from its entry point (``bootstrap``); only S3 needs them."""
    if url is None:
        if settings is None:
            raise ValueError("open_object_store needs a URL or the StorageSettings")
        url = settings.url
    scheme = url.split("://", 1)[0].lower() if "://" in url else "file"
    try:
        opener = BACKENDS[scheme]
    except KeyError:
        known = ", ".join(f"{name}://" for name in BACKENDS)
        raise ValueError(
            f"unknown object store scheme {scheme!r} in {url!r}; known: {known}"
        ) from None
    return opener(url, settings)
