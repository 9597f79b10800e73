"""Composition root: the one place where the service layer's dependencies are wired.

``bootstrap(settings, embedded=...)`` returns a ``Services`` container that every use case
(``concepts``, ``pipeline``, ``answering``) takes as its first argument. Entry points (gRPC
servicers, Celery tasks, the CLI, the demo) call it once per process.

* ``embedded=True``: objects in ``<data_dir>/objects``, keys in the milvus-lite file
  ``<data_dir>/index/milvus.db`` (one process only), tasks run in this process. No server needed.
* ``embedded=False``: the configured object store (``PERSONALKV_STORAGE_URL``, S3 in the stack)
  and index (``PERSONALKV_INDEX_URI``, a Milvus server), and Celery on Redis for tasks.

The index, the model adapter and the retrieval encoders open lazily on first use, so processes
that never encode or answer (the ingestion API) never load them. The pipeline mines through
``Services.miner`` (``mining_port.mine``) and hands it this process's one adapter (profiles)
and the user's stored photo descriptors (``Services.descriptors``); the Ask retriever re-ranks
photo evidence with each user's recognizer (``Services.recognizers``). Tests pass their own
``adapter`` / ``task_queue`` (real implementations, e.g. the tiny model, synchronous tasks).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from personalkv.config import Settings, apply_process_environment
from personalkv.index.base import KeyIndex
from personalkv.models.base import ModelAdapter
from personalkv.retrieval.keys import KeyBuilder
from personalkv.retrieval.retriever import Retriever
from personalkv.service_layer import mining_port
from personalkv.service_layer.chunk_cache import ChunkCache
from personalkv.service_layer.task_queue import CeleryTaskQueue, InProcessTaskQueue, TaskQueue
from personalkv.storage.chunk_store import ChunkStore

log = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    store: ChunkStore
    chunk_cache: ChunkCache
    task_queue: TaskQueue
    index_factory: Callable[[], KeyIndex]
    adapter_factory: Callable[[], ModelAdapter]
    keys_factory: Callable[[], KeyBuilder]
    embedded: bool = True
    miner: Callable = field(default=None, repr=False)  # mining_port.mine unless a test swaps it
    _index: KeyIndex | None = field(default=None, repr=False)
    _adapter: ModelAdapter | None = field(default=None, repr=False)
    _keys: KeyBuilder | None = field(default=None, repr=False)
    _retriever: Retriever | None = field(default=None, repr=False)
    _descriptors: object | None = field(default=None, repr=False)
    _recognizers: object | None = field(default=None, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def _once(self, attr: str, make: Callable[[], object]):
        """The value of field ``attr``, built by ``make()`` on first use (thread-safe: one build
        per process even under concurrent first requests; the lock is re-entrant, so ``make``
        may use other lazy parts)."""
        value = getattr(self, attr)
        if value is None:
            with self._lock:
                value = getattr(self, attr)
                if value is None:
                    value = make()
                    setattr(self, attr, value)
        return value

    @property
    def index(self) -> KeyIndex:
        """The key index, opened on first use (a milvus-lite file is locked by its opener)."""
        return self._once("_index", self.index_factory)

    @property
    def adapter(self) -> ModelAdapter:
        """The VLM, loaded on first use (thread-safe; shared by all requests)."""
        return self._once("_adapter", self.adapter_factory)

    @property
    def keys(self) -> KeyBuilder:
        return self._once("_keys", self.keys_factory)

    @property
    def descriptors(self):
        """Per-photo mining descriptors in the object store (``mining.descriptors``)."""
        def make():
            from personalkv.mining.descriptors import DescriptorStore

            return DescriptorStore(self.store.objects, self.settings.mining)

        return self._once("_descriptors", make)

    @property
    def recognizers(self):
        """Each user's recognizer, kept for this process (``mining.served``)."""
        def make():
            from personalkv.mining.served import ServedRecognizers

            return ServedRecognizers(
                self.store, self.descriptors, self.settings.mining,
                accept_at=min(max(self.settings.retrieval.threshold, 0.01), 0.99),
                adapter=lambda: self.adapter)

        return self._once("_recognizers", make)

    @property
    def retriever(self) -> Retriever:
        def make():
            rerank = (self.recognizers.rerank
                      if self.settings.retrieval.photo_reranker == "recognizer" else None)
            return Retriever(self.index, self.keys, self.settings.retrieval,
                             visual_reranker=rerank)

        return self._once("_retriever", make)

    def close(self) -> None:
        self.task_queue.close()
        if self._index is not None:
            self._index.close()
            self._index = None


def default_adapter_factory(settings: Settings) -> Callable[[], ModelAdapter]:
    def load() -> ModelAdapter:
        from personalkv.models import load_adapter

        m = settings.model
        log.info("loading model %s on %s (%s)", m.name, m.device, m.dtype)
        return load_adapter(m.name, m.device, m.dtype, settings=m)

    return load


def default_keys_factory(settings: Settings) -> Callable[[], KeyBuilder]:
    def build() -> KeyBuilder:
        from personalkv.retrieval.encoders import get_image_encoder, get_text_encoder

        r = settings.retrieval
        return KeyBuilder(get_text_encoder(r.text_encoder), get_image_encoder(r.image_encoder))

    return build


def embedded_paths(settings: Settings) -> tuple[Path, Path]:
    """(object dir, milvus-lite file) of embedded mode."""
    root = Path(settings.service.data_dir).resolve()
    return root / "objects", root / "index" / "milvus.db"


def bootstrap(
    settings: Settings,
    *,
    embedded: bool,
    adapter: ModelAdapter | Callable[[], ModelAdapter] | None = None,
    task_queue: TaskQueue | None = None,
    synchronous_tasks: bool = False,
) -> Services:
    """Wire a ``Services`` container (see module docstring)."""
    from personalkv.index import open_key_index

    apply_process_environment(settings)  # before any model or encoder loads
    if embedded:
        objects_dir, index_file = embedded_paths(settings)
        objects_dir.mkdir(parents=True, exist_ok=True)
        store = ChunkStore.open(f"file://{objects_dir}", settings.storage)
        index_factory = lambda: open_key_index(
            str(index_file), prefix=settings.index.collection_prefix)
        queue = task_queue or InProcessTaskQueue(synchronous=synchronous_tasks)
    else:
        store = ChunkStore.open(settings.storage.url, settings.storage)
        index_factory = lambda: open_key_index(
            settings.index.uri, prefix=settings.index.collection_prefix, token=settings.index.token)
        if task_queue is None:
            from personalkv.service_layer.celery_app import make_celery

            task_queue = CeleryTaskQueue(make_celery(settings.celery))
        queue = task_queue
    if isinstance(adapter, ModelAdapter):
        instance = adapter
        adapter_factory = lambda: instance
    else:
        adapter_factory = adapter or default_adapter_factory(settings)
    services = Services(
        settings=settings, store=store, index_factory=index_factory,
        chunk_cache=ChunkCache(settings.service.chunk_cache_bytes), task_queue=queue,
        adapter_factory=adapter_factory, keys_factory=default_keys_factory(settings),
        embedded=embedded, miner=mining_port.mine,
    )
    queue.bind(services)
    return services
