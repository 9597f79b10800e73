"""The KV core on a CUDA device: placement, recompute, codec decode onto the device, and the bf16
and int8 tolerances. Skipped where no CUDA device is present (the CPU tests cover the logic;
these cover device placement and the GPU kernels' numerics)."""

from __future__ import annotations

import pytest
import torch

from personalkv.config import ModelSettings
from personalkv.kv.codec import decode_chunk, encode_chunk
from personalkv.kv.engine import GenerationOptions, answer, encode_evidence
from personalkv.models import load_adapter
from tests.plugins.models import make_photo
from tests.unit.kv.test_placement_cpu import QUESTION, block_reference, evidence

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# fp32 on GPU: other kernels and reduction orders than the CPU (TF32 stays off for matmuls by
# default), logits O(1) -> differences ~1e-6; 1e-4 leaves two orders of margin.
GPU_FP32_TOL = 1e-4
# bf16 keeps 8 mantissa bits (relative step 2^-8 ~ 3.9e-3): over 2 layers with O(1) logits the
# placed path and a bf16 full prefill round differently by ~1e-2; KL well under 1e-2.
BF16_KL = 1e-2
# int8 chunks: each element errs by at most max|channel| / 254 (tested on CPU); its effect on
# the next-token distribution of the tiny model stays well below 1e-3 in KL.
INT8_KL = 1e-3


def _kl(p_logits, q_logits) -> float:
    p = torch.log_softmax(p_logits.double(), -1)
    q = torch.log_softmax(q_logits.double(), -1)
    return float((p.exp() * (p - q)).sum())


def _chunks(adapter, parts_list, quantization="none"):
    out = []
    for i, parts in enumerate(parts_list):
        chunk = encode_evidence(adapter, parts, user_id="alice", concept_id=f"c{i}", kind="profile_text",
                                content=str(i).encode())
        out.append(decode_chunk(encode_chunk(chunk, quantization), expected_model=adapter.fingerprint(),
                                dtype=adapter.dtype, device=adapter.device))
    return out


@pytest.mark.parametrize("kind", ["qwen2_vl", "llava_onevision", "causal_lm"])
def test_placed_chunks_on_gpu_equal_block_reference_and_full_recompute(kind):
    adapter = load_adapter(f"tiny:{kind}", device="cuda", settings=ModelSettings())
    parts_list = evidence(adapter, make_photo)
    chunks = _chunks(adapter, parts_list)
    assert all(c.keys[0].device.type == "cuda" for c in chunks)  # decoded straight onto the device
    reference, segments = block_reference(adapter, parts_list, QUESTION)
    placed = answer(adapter, chunks, QUESTION, options=GenerationOptions(max_new_tokens=1))
    assert (placed.first_logits - reference).abs().max().item() <= GPU_FP32_TOL
    full = adapter.reference_forward(segments, logits_to_keep=1)[-1]
    for strategy in ("deviation", "first"):
        result = answer(adapter, chunks, QUESTION, options=GenerationOptions(
            max_new_tokens=1, recompute_ratio=1.0, recompute_strategy=strategy))
        assert (result.first_logits - full).abs().max().item() <= GPU_FP32_TOL
        partial = answer(adapter, chunks, QUESTION, options=GenerationOptions(
            max_new_tokens=1, recompute_ratio=0.3, recompute_strategy=strategy))
        assert partial.recomputed_tokens > 0


def test_bf16_single_chunk_matches_bf16_full_prefill():
    adapter = load_adapter("tiny:causal_lm", device="cuda", dtype="bfloat16", settings=ModelSettings())
    parts_list = evidence(adapter, make_photo)[:1]
    chunks = _chunks(adapter, parts_list)
    assert chunks[0].keys[0].dtype == torch.bfloat16
    _, segments = block_reference(adapter, parts_list, QUESTION)
    full = adapter.reference_forward(segments, logits_to_keep=1)[-1]
    placed = answer(adapter, chunks, QUESTION, options=GenerationOptions(max_new_tokens=1))
    assert _kl(full, placed.first_logits) <= BF16_KL


def test_int8_chunks_on_gpu_stay_close_to_full_precision():
    adapter = load_adapter("tiny:qwen2_vl", device="cuda", settings=ModelSettings())
    parts_list = evidence(adapter, make_photo)
    exact = answer(adapter, _chunks(adapter, parts_list), QUESTION, options=GenerationOptions(max_new_tokens=1))
    int8 = answer(adapter, _chunks(adapter, parts_list, "int8"), QUESTION,
                  options=GenerationOptions(max_new_tokens=1))
    assert _kl(exact.first_logits, int8.first_logits) <= INT8_KL
