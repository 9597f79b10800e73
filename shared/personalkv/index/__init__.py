"""Retrieval keys in a vector index (Milvus). Open one with :func:`open_key_index`.

Backends are chosen by URI scheme and imported lazily, so importing this package needs neither
pymilvus nor milvus-lite. Files and ``http(s)://`` are served by the MilvusClient backend;
``memory://`` by the in-memory reference index (tests); a new backend adds one line to
``_BACKENDS``.
"""

from __future__ import annotations

import importlib

from personalkv.index.base import (
    IndexEntry, IndexRequestError, IndexStats, IndexUnavailable, KeyIndex, KeysNotVisible,
    SearchHit, SearchRequest, VectorSpace,
)

# scheme -> "module:class"; "" is a local file path (milvus-lite, embedded).
_BACKENDS = {
    "": "personalkv.index.milvus:MilvusKeyIndex",
    "http": "personalkv.index.milvus:MilvusKeyIndex",
    "https": "personalkv.index.milvus:MilvusKeyIndex",
    "memory": "personalkv.index.memory:InMemoryKeyIndex",
}


def open_key_index(uri: str, **options) -> KeyIndex:
    """``uri``: a file path (milvus-lite, one process only), ``http(s)://host:port`` (a Milvus
    server or cluster) or ``memory://`` (in-process, tests); the service passes
    ``IndexSettings.uri`` (``personalkv.bootstrap``). ``options`` go to the backend (the Milvus
    ones: ``prefix``, ``token``, ``db_name``, ``ca_file``, ``tls_server_name``)."""
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    if scheme not in _BACKENDS:
        raise ValueError(f"unknown index URI scheme {scheme!r}; known: {sorted(_BACKENDS)}")
    if not scheme:
        import pathlib

        pathlib.Path(uri).parent.mkdir(parents=True, exist_ok=True)
    module, cls = _BACKENDS[scheme].split(":")
    return getattr(importlib.import_module(module), cls)(uri, **options)


__all__ = [
    "IndexEntry", "IndexRequestError", "IndexStats", "IndexUnavailable", "KeyIndex",
    "KeysNotVisible", "SearchHit", "SearchRequest", "VectorSpace", "open_key_index",
]
