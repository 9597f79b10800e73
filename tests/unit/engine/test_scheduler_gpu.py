"""The batched scheduler on a CUDA device, in bfloat16 (what the chart serves) with the
``query`` and ``salience`` recompute strategies: concurrent requests through one loop give the
answers they give alone (bf16: >= 90 % of greedy tokens identical, the bound of
``test_bf16_cpu.BATCHED_TOL``), and a NaN row fails alone. Skipped without CUDA
(``make test-gpu`` runs this tier and ``benchmarks.gpu_load``)."""

from __future__ import annotations

import threading

import pytest
import torch

from personalkv.config import ModelSettings
from personalkv.engine.scheduler import BatchScheduler, ModelJob, ThreadAnswerer
from personalkv.kv.conversation import ConversationKV
from personalkv.kv.engine import GenerationOptions, encode_evidence
from personalkv.models import load_adapter
from personalkv.models.tiny import KINDS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

FACTS = ["Rex is my dog. A brown dog with a black collar.\n", "Bobo is my mug. A blue mug.\n"]
QUESTIONS = ["What colour is Rex's collar?", "What is Bobo?", "Hello!", "Tell me about my things."]


def _jobs(adapter, strategy):
    chunks = [encode_evidence(adapter, [t], user_id="alice", concept_id=f"c{i}", kind="profile_text",
                              content=t.encode()) for i, t in enumerate(FACTS)]
    return [ModelJob(state=ConversationKV(), chunks=chunks[: i % 3], question=q, image=None,
                     options=GenerationOptions(max_new_tokens=12, recompute_ratio=0.1,
                                               recompute_strategy=strategy))
            for i, q in enumerate(QUESTIONS)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("strategy", ["query", "salience"])
def test_batched_bf16_answers_match_solo_on_cuda(kind, strategy):
    adapter = load_adapter(f"tiny:{kind}", device="cuda", dtype="bfloat16", settings=ModelSettings())
    solo = [ThreadAnswerer(lambda: adapter).run(job).token_ids for job in _jobs(adapter, strategy)]
    scheduler = BatchScheduler(lambda: adapter, queue_size=16, max_batch=16, max_tokens_in_flight=1 << 20)
    jobs, results = _jobs(adapter, strategy), {}
    threads = [threading.Thread(target=lambda i=i, j=j: results.__setitem__(i, scheduler.run(j)))
               for i, j in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    scheduler.close()
    same = sum(a == b for i, s in enumerate(solo) for a, b in zip(s, results[i].token_ids))
    total = sum(len(s) for s in solo)
    assert same >= 0.9 * total, (same, total)
