"""Composition root: the one place where the service layer's dependencies are wired.

``bootstrap(settings)`` returns the ``Services`` container (``personalkv.service_layer.services``)
that every use case (``concepts``, ``pipeline``, ``answering``) takes as its first argument.
Entry points (gRPC servers, Celery workers, the commands, the demo) call it once per process.
Everything comes from ``settings``:

* the object store from ``PERSONALKV_STORAGE_URL`` (a local directory, S3, or ``memory://``),
  the key index from ``PERSONALKV_INDEX_URI`` (a milvus-lite file, a Milvus server, ``memory://``);
* the task queue from ``PERSONALKV_SERVICE_TASK_QUEUE``: Celery on the configured broker
  (``personalkv.celery_app``), or this process (``inprocess`` on a background thread, ``inline``
  in the caller's thread), whose handlers are the pipeline's use cases bound to these Services.

Embedded mode (the CLI without ``--stack``, ``serve --embedded``, the demo, the evaluations) is
nothing more than ``settings.embedded()``: data-dir URLs and in-process tasks.

The index, the model adapter and the retrieval encoders open lazily on first use. The pipeline
mines through ``Services.miner`` (``mining_port.mine``) and hands it this process's one adapter
(profiles) and the user's stored photo descriptors (``Services.descriptors``); the Ask retriever
re-ranks photo evidence with each user's recognizer (``Services.recognizers``). Tests pass their
own ``adapter`` (e.g. the tiny model) or ``task_queue``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

from personalkv.config import Settings, apply_process_environment
from personalkv.models.base import ModelAdapter
from personalkv.retrieval.keys import KeyBuilder
from personalkv.service_layer import mining_port, pipeline
from personalkv.service_layer.chunk_cache import ChunkCache
from personalkv.service_layer.conversation_cache import ConversationCache
from personalkv.service_layer.services import Builders, Services
from personalkv.service_layer.task_queue import (
    TASK_CACHE, TASK_MINE, InProcessTaskQueue, TaskHandler, TaskQueue,
)
from personalkv.storage.chunk_store import ChunkStore

log = logging.getLogger(__name__)


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


def _descriptors(svc: Services):
    from personalkv.mining.descriptors import DescriptorStore

    return DescriptorStore(svc.store.objects, svc.settings.mining)


def _recognizers(svc: Services):
    from personalkv.mining.served import ServedRecognizers

    return ServedRecognizers(
        svc.store, svc.descriptors, svc.settings.mining,
        accept_at=min(max(svc.settings.retrieval.threshold, 0.01), 0.99),
        adapter=lambda: svc.adapter)


def _retriever(svc: Services):
    from personalkv.retrieval.retriever import Retriever

    rerank = (svc.recognizers.rerank
              if svc.settings.retrieval.photo_reranker == "recognizer" else None)
    return Retriever(svc.index, svc.keys, svc.settings.retrieval, visual_reranker=rerank)


def _task_queue(settings: Settings) -> TaskQueue:
    kind = settings.service.task_queue
    if kind == "celery":
        from personalkv.celery_app import CeleryTaskQueue, make_celery

        return CeleryTaskQueue(make_celery(settings.celery))
    return InProcessTaskQueue(synchronous=kind == "inline")


def _answerer(services: Services):
    from personalkv.observability import SERVING
    from personalkv.engine.scheduler import BatchScheduler, ThreadAnswerer

    limits = services.settings.service
    if limits.answer_scheduler == "threads":
        return ThreadAnswerer(lambda: services.adapter, observer=SERVING)
    return BatchScheduler(lambda: services.adapter, queue_size=limits.answer_queue_size,
                          max_batch=limits.answer_max_batch,
                          max_tokens_in_flight=limits.answer_max_tokens_in_flight,
                          max_wait_s=limits.answer_max_wait_s,
                          prefill_piece_tokens=limits.answer_prefill_piece_tokens,
                          prefill_pieces_per_step=limits.answer_prefill_pieces_per_step,
                          kv_budget_bytes=limits.answer_kv_budget_bytes,
                          reserved_bytes=limits.chunk_cache_bytes + limits.conversation_cache_bytes,
                          observer=SERVING)


def task_handlers(services: Services) -> dict[str, TaskHandler]:
    """What an in-process queue runs for each task name: the pipeline's use cases."""
    return {TASK_MINE: partial(pipeline.mine_concept, services),
            TASK_CACHE: partial(pipeline.cache_concept, services)}


def bootstrap(
    settings: Settings,
    *,
    adapter: ModelAdapter | Callable[[], ModelAdapter] | None = None,
    task_queue: TaskQueue | None = None,
) -> Services:
    """Wire a ``Services`` container from ``settings`` (see module docstring)."""
    from personalkv.index import open_key_index

    apply_process_environment(settings)  # before any model or encoder loads
    index = settings.index
    if isinstance(adapter, ModelAdapter):
        instance = adapter
        adapter_factory = lambda: instance  # noqa: E731
    else:
        adapter_factory = adapter or default_adapter_factory(settings)
    builders = Builders(
        index=lambda: open_key_index(index.uri, prefix=index.collection_prefix, token=index.token,
                                     db_name=index.db_name, ca_file=index.ca_file,
                                     tls_server_name=index.tls_server_name),
        adapter=adapter_factory, keys=default_keys_factory(settings),
        descriptors=_descriptors, recognizers=_recognizers, retriever=_retriever,
        answerer=_answerer,
    )
    queue = task_queue or _task_queue(settings)
    services = Services(
        settings=settings, store=ChunkStore.open(settings.storage.url, settings.storage),
        chunk_cache=ChunkCache(settings.service.chunk_cache_bytes), task_queue=queue,
        conversations=ConversationCache(settings.service.conversation_cache_bytes,
                                        settings.service.conversation_idle_s),
        builders=builders, miner=mining_port.mine,
    )
    queue.bind(task_handlers(services))
    return services
