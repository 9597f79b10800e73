"""``Services``: what every use case takes as its first argument.

Built by the composition root (``personalkv.bootstrap``), once per process. The store, the
hot-chunk cache, the live conversations' KV and the task queue are there from the start; the key index, the model adapter,
the retrieval encoders, the stored photo descriptors, the per-user recognizers, the
retriever and the model scheduler (``answerer``) open lazily on first use, from the ``Builders`` the composition root passes, so a
process that never answers (the ingestion API) never loads a model.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from personalkv.config import Settings
from personalkv.index.base import KeyIndex
from personalkv.mining.output import MiningOutput
from personalkv.models.base import ModelAdapter
from personalkv.retrieval.keys import KeyBuilder
from personalkv.retrieval.retriever import Retriever
from personalkv.service_layer.chunk_cache import ChunkCache
from personalkv.service_layer.conversation_cache import ConversationCache
from personalkv.service_layer.photo_slots import FairSlots
from personalkv.service_layer.task_queue import TaskQueue
from personalkv.storage.chunk_store import ChunkStore

if TYPE_CHECKING:  # OpenCV and the recognizer load only where photos are recognized
    from personalkv.mining.descriptors import DescriptorStore
    from personalkv.mining.served import ServedRecognizers
    from personalkv.engine.scheduler import Answerer

#: The pipeline's miner (``service_layer.mining_port.mine`` unless a test swaps it).
Miner = Callable[..., MiningOutput]


@dataclass(frozen=True)
class Builders:
    """How the lazy parts of ``Services`` are made (each called at most once per process)."""

    index: Callable[[], KeyIndex]
    adapter: Callable[[], ModelAdapter]
    keys: Callable[[], KeyBuilder]
    descriptors: Callable[[Services], DescriptorStore]
    recognizers: Callable[[Services], ServedRecognizers]
    retriever: Callable[[Services], Retriever]
    answerer: Callable[[Services], Answerer]


@dataclass
class Services:
    settings: Settings
    store: ChunkStore
    chunk_cache: ChunkCache
    task_queue: TaskQueue
    conversations: ConversationCache
    builders: Builders = field(repr=False)
    miner: Miner = field(repr=False)
    _built: dict[str, object] = field(default_factory=dict, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def _once(self, name: str, make: Callable[[], object]):
        """The part ``name``, built by ``make()`` on first use (thread-safe: one build per
        process even under concurrent first requests; the lock is re-entrant, so ``make`` may
        use other lazy parts)."""
        value = self._built.get(name)
        if value is None:
            with self._lock:
                value = self._built.get(name)
                if value is None:
                    value = self._built[name] = make()
        return value

    def is_built(self, name: str) -> bool:
        """Whether the lazy part ``name`` (index, adapter, keys, ...) was built already."""
        return name in self._built

    def replace(self, name: str, value: object) -> None:
        """Swap a lazy part (a model change in a test: another adapter, other fingerprint)."""
        with self._lock:
            self._built[name] = value

    @property
    def index(self) -> KeyIndex:
        """The key index, opened on first use (a milvus-lite file is locked by its opener)."""
        return self._once("index", self.builders.index)

    @property
    def adapter(self) -> ModelAdapter:
        """The VLM, loaded on first use (thread-safe; shared by all requests)."""
        return self._once("adapter", self.builders.adapter)

    @property
    def keys(self) -> KeyBuilder:
        return self._once("keys", self.builders.keys)

    @property
    def descriptors(self) -> DescriptorStore:
        """Per-photo mining descriptors in the object store (``mining.descriptors``)."""
        return self._once("descriptors", lambda: self.builders.descriptors(self))

    @property
    def recognizers(self) -> ServedRecognizers:
        """Each user's recognizer, kept for this process (``mining.served``)."""
        return self._once("recognizers", lambda: self.builders.recognizers(self))

    @property
    def retriever(self) -> Retriever:
        return self._once("retriever", lambda: self.builders.retriever(self))

    @property
    def photo_slots(self) -> FairSlots:
        """Photo recognitions that may run at once (``service.photo_recognitions``), shared
        fairly between users (``service_layer.photo_slots``)."""
        return self._once("photo_slots", lambda: FairSlots(self.settings.service.photo_recognitions))

    @property
    def answerer(self) -> Answerer:
        """Runs the model part of every Ask (``engine.scheduler``: batched or threads)."""
        return self._once("answerer", lambda: self.builders.answerer(self))

    def close(self) -> None:
        self.task_queue.close()
        with self._lock:
            answerer = self._built.pop("answerer", None)
        if answerer is not None:
            answerer.close()
        with self._lock:
            index = self._built.pop("index", None)
        if index is not None:
            index.close()
