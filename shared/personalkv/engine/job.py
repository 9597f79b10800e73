"""The model's part of one Ask, as the engine takes it (``ModelJob``): what the scheduler
queues and plans and the runner executes. Its own module so that both can name it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from PIL import Image

from personalkv.kv.chunk import KVChunk
from personalkv.kv.conversation import ConversationKV
from personalkv.kv.generation import AnswerResult, GenerationOptions


@dataclass(eq=False)
class ModelJob:
    """The model's part of one Ask: a turn of ``state`` (a fresh ``ConversationKV`` for a
    single-turn Ask) with this turn's new ``chunks``."""

    state: ConversationKV
    chunks: Sequence[KVChunk]
    question: str
    image: Image.Image | None
    options: GenerationOptions
    on_token: Callable[[int], None] | None = None
    #: keep the KV of the answer in ``state`` (a conversation continues from it)
    keep: bool = False
    #: ``time.monotonic()`` after which nobody waits for the answer
    deadline: float | None = None
    cancelled: Callable[[], bool] = lambda: False
    # filled in by the scheduler
    queued_at: float = field(default_factory=time.monotonic)
    queue_s: float = 0.0
    result: AnswerResult | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    #: set by ``run`` when its caller stopped waiting: the loop drops the job at its next look
    abandoned: bool = False
    #: KV tokens its row will hold (``Runner.need``), estimated once by ``run``
    need: int = 0
