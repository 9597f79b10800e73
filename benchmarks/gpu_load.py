"""`make test-gpu`'s load test: 60 s of concurrent Asks through the batched scheduler on a CUDA
device in bfloat16, printing tokens/s and TTFT (p50 / p99); writes
benchmarks/results/gpu_load.json. Without CUDA it says so and exits 0 (the tier skips).

The model: PERSONALKV_GPU_LOAD_MODEL (default ``smollm2``: real weights, offline); 16 client
threads in closed loop, each Ask with 2 placed profile chunks (``query`` recompute at 0.1) and
64 new tokens."""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import sys
import threading
import time

import torch

SECONDS, CLIENTS, NEW_TOKENS = 60.0, 16, 64
FACTS = ["Rex is my dog. A brown dog with a black collar; he loves the park.\n",
         "Bobo is my mug. A blue mug with a red star on its side.\n"]


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_load: skipped (no CUDA device)")
        return 0
    from personalkv.config import ModelSettings
    from personalkv.engine.scheduler import BatchScheduler, ModelJob
    from personalkv.kv.conversation import ConversationKV
    from personalkv.kv.engine import GenerationOptions, encode_evidence
    from personalkv.models import load_adapter

    name = os.environ.get("PERSONALKV_GPU_LOAD_MODEL", "smollm2")
    adapter = load_adapter(name, device="cuda", dtype="bfloat16", settings=ModelSettings())
    chunks = [encode_evidence(adapter, [t], user_id="alice", concept_id=f"c{i}", kind="profile_text",
                              content=t.encode()) for i, t in enumerate(FACTS)]
    scheduler = BatchScheduler(lambda: adapter, queue_size=64, max_batch=CLIENTS, max_tokens_in_flight=1 << 20)
    ttft, tokens, lock, stop = [], [0], threading.Lock(), time.monotonic() + SECONDS

    def client(k: int) -> None:
        while time.monotonic() < stop:
            first: list[float] = []
            started = time.perf_counter()
            job = ModelJob(state=ConversationKV(), chunks=chunks, question=f"Question {k}: what is Rex like?",
                           image=None, options=GenerationOptions(max_new_tokens=NEW_TOKENS, recompute_ratio=0.1,
                                                                 recompute_strategy="query"),
                           on_token=lambda _t: first or first.append(time.perf_counter() - started))
            out = scheduler.run(job)
            with lock:
                tokens[0] += len(out.token_ids)
                ttft.extend(first)

    begun = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - begun
    scheduler.close()
    ttft.sort()
    figures = {"model": name, "device": torch.cuda.get_device_name(), "dtype": "bfloat16",
               "clients": CLIENTS, "seconds": round(wall, 1), "tokens_per_s": round(tokens[0] / wall, 1),
               "ttft_p50_s": round(statistics.median(ttft), 4),
               "ttft_p99_s": round(ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))], 4), "asks": len(ttft)}
    print(json.dumps(figures, indent=2))
    out = pathlib.Path(__file__).parent / "results" / "gpu_load.json"
    out.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
