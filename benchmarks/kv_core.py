"""KV core benchmark: time to first token over ~2,000 tokens of retrieved evidence.

(A) full prefill of evidence + question (decoder only, logits for the last position, as
    generation does; image features precomputed, so A does not even pay the vision tower);
(B) chunks decoded from bytes, placed (RoPE-shifted), question prefilled;
(C) as B with selective recompute r=0.15 (CacheBlend-style deviation selection);
floor of B: decoding the chunk bytes + prefilling the question over a cache already in memory.
Model: Qwen2-VL-2B-Instruct's real per-layer dimensions (hidden 1536, 12 heads, 2 KV heads,
head_dim 128, MLP 8960, vocab 151,936, M-RoPE sections 16/24/24) with random weights and
PERSONALKV_BENCH_LAYERS layers (default 4 of 28), fp32 on this CPU.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np
import torch
from PIL import Image

from personalkv.config import BenchSettings
from personalkv.kv.codec import decode_chunk, encode_chunk
from personalkv.kv.engine import encode_evidence, prefill
from personalkv.kv.placement import place_chunks
from personalkv.kv.recompute import recompute
from personalkv.models.tiny import tiny_model

NAME = "kv_core"

QWEN2_VL_2B = dict(
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_attention_heads=12,
    num_key_value_heads=2,
    max_position_embeddings=32768,
)
FULL_LAYERS = 28


def _timeit(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _evidence(adapter):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    # 448x448 photos -> 32x32 patches -> 256 merged tokens per image chunk, as a real patch would give.
    adapter.image_processor = Qwen2VLImageProcessorPil(min_pixels=448 * 448, max_pixels=448 * 448)
    rng = np.random.default_rng(0)
    words = "collar leather brown black ears floppy tail short striped handle chipped blue mug logo red star".split()
    parts = []
    for i in range(6):
        text = " ".join(rng.choice(words, size=90))
        parts.append(("profile_text", [f"Concept <c{i}>: {text}\n"]))
    for i in range(4):
        photo = Image.fromarray((rng.random((448, 448, 3)) * 255).astype("uint8"))
        parts.append(("image_patch", [f"Photo detail of <c{i}>: ", adapter.encode_image(photo), "\n"]))
    return parts


def run() -> dict:
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    sizes = BenchSettings()
    layers, repeats = sizes.layers, sizes.repeats
    print(f"[kv_core] building Qwen2-VL-2B-shaped model with {layers} layers (random weights) ...", flush=True)
    adapter = tiny_model("qwen2_vl", seed=0, dims={**QWEN2_VL_2B, "num_hidden_layers": layers})
    evidence = _evidence(adapter)
    question = "Which of my things has a chipped blue handle, and what is written on it?"
    print("[kv_core] encoding evidence chunks ...", flush=True)
    chunks = [
        encode_evidence(adapter, parts, user_id="bench", concept_id=f"c{i}", kind=kind, content=str(i).encode())
        for i, (kind, parts) in enumerate(evidence)
    ]
    blobs = [encode_chunk(c) for c in chunks]
    evidence_tokens = sum(c.meta.token_count for c in chunks)
    fingerprint = adapter.fingerprint()

    prefix_seg = adapter.build_segment([adapter.system_prefix_text()])
    segments = [adapter.build_segment(parts) for _, parts in evidence]
    q_seg = adapter.build_segment(adapter.question_parts(question))

    def full_prefill():
        with torch.inference_mode():
            cache = adapter.new_cache()
            embeds, positions, start = [], [], 0
            for seg in [prefix_seg, *segments, q_seg]:
                pos, start = adapter.segment_positions(seg, start)
                positions.append(pos)
                embeds.append(adapter.embed(seg.token_ids, seg.image_embeds()))
            hidden = adapter.run_decoder(torch.cat(embeds, 1), torch.cat(positions, 1), cache)
            return adapter.logits(hidden[:, -1:])[0, -1]

    def placed(ratio: float):
        def go():
            with torch.inference_mode():
                loaded = [decode_chunk(b, expected_model=fingerprint) for b in blobs]
                ctx = place_chunks(adapter, loaded)
                if ratio:
                    recompute(adapter, ctx, ratio, "deviation")
                return prefill(adapter, ctx, q_seg)
        return go

    with torch.inference_mode():
        ready = place_chunks(adapter, chunks)
        ready_layers = [adapter.cache_kv(ready.cache, i) for i in range(layers)]

    def floor_decode():
        with torch.inference_mode():
            return [decode_chunk(b, expected_model=fingerprint) for b in blobs]

    def floor_question():
        with torch.inference_mode():
            ctx = ready
            ctx.cache = adapter.new_cache(ready_layers)  # adopted: prefill appends by copy
            ctx.next_position = ready.placed[-1].positions.max().item() + 1
            return prefill(adapter, ctx, q_seg)

    # Warm up every path once (allocator, thread pools).
    full_prefill(); placed(0.0)(); placed(0.15)()
    print(f"[kv_core] timing over {evidence_tokens} evidence tokens, median of {repeats} ...", flush=True)
    t_a, logits_a = _timeit(full_prefill, repeats)
    t_b, logits_b = _timeit(placed(0.0), repeats)
    t_c, logits_c = _timeit(placed(0.15), repeats)
    t_read, _ = _timeit(floor_decode, repeats)
    t_q, _ = _timeit(floor_question, repeats)
    floor = t_read + t_q

    # Deviation from full prefill as the recompute share grows (not timed): shows the mechanism
    # converging to 0 at r=1, whatever the weights.
    curve = {}
    for strategy in ("deviation", "first"):
        for ratio in (0.15, 0.3, 0.5, 1.0):
            with torch.inference_mode():
                ctx = place_chunks(adapter, [decode_chunk(b) for b in blobs])
                recompute(adapter, ctx, ratio, strategy)
                logits = prefill(adapter, ctx, q_seg)
            curve[f"{strategy}@{ratio}"] = _deviation(logits, logits_a)
    print(f"[kv_core] deviation vs recompute share: {curve}", flush=True)

    kv_bytes_fp32 = sum(len(b) for b in blobs)
    bf16 = [encode_chunk(_cast(c, torch.bfloat16)) for c in chunks]
    int8 = [encode_chunk(_cast(c, torch.bfloat16), "int8") for c in chunks]
    per_layer_bf16 = sum(sum(k.numel() + v.numel() for k, v in zip(c.keys, c.values)) for c in chunks) * 2 / layers
    return {
        "model": "Qwen2-VL-2B-Instruct dims, random weights",
        "layers": layers,
        "dtype": "float32",
        "evidence_tokens": evidence_tokens,
        "chunks": len(chunks),
        "question_tokens": q_seg.num_tokens,
        "ttft_s_full_prefill": round(t_a, 4),
        "ttft_s_placed": round(t_b, 4),
        "ttft_s_recompute_0.15": round(t_c, 4),
        "floor_s_placed": round(floor, 4),
        "ttft_ratio_prefill_over_placed": round(t_a / t_b, 2),
        "ttft_ratio_prefill_over_recompute": round(t_a / t_c, 2),
        "placed_over_floor": round(t_b / floor, 3),
        "bytes_per_token_fp32": round(kv_bytes_fp32 / evidence_tokens, 1),
        "bytes_per_token_bf16": round(sum(map(len, bf16)) / evidence_tokens, 1),
        "bytes_per_token_int8": round(sum(map(len, int8)) / evidence_tokens, 1),
        "kv_bytes_per_token_bf16_28_layers": round(per_layer_bf16 * FULL_LAYERS / evidence_tokens, 1),
        "logit_dev_placed": _deviation(logits_b, logits_a)["max_abs"],
        "logit_dev_recompute": _deviation(logits_c, logits_a)["max_abs"],
        "logit_scale": float(logits_a.abs().max()),
        "deviation_placed": _deviation(logits_b, logits_a),
        "deviation_recompute": _deviation(logits_c, logits_a),
        "deviation_by_recompute_share": curve,
    }


def _deviation(logits: torch.Tensor, reference: torch.Tensor) -> dict:
    """Max / mean absolute logit difference, KL(reference || logits) and top-1 agreement."""
    log_p, log_q = torch.log_softmax(reference.float(), -1), torch.log_softmax(logits.float(), -1)
    return {
        "max_abs": round(float((logits - reference).abs().max()), 5),
        "mean_abs": round(float((logits - reference).abs().mean()), 5),
        "kl": round(float((log_p.exp() * (log_p - log_q)).sum()), 6),
        "top1_agree": bool(int(logits.argmax()) == int(reference.argmax())),
    }


def _cast(chunk, dtype):
    import dataclasses

    return dataclasses.replace(
        chunk,
        meta=dataclasses.replace(chunk.meta, dtype=str(dtype).removeprefix("torch.")),
        keys=[k.to(dtype) for k in chunk.keys],
        values=[v.to(dtype) for v in chunk.values],
        image_embeds=None if chunk.image_embeds is None else chunk.image_embeds.to(dtype),
    )


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
