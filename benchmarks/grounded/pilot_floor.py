"""Issue 28 pilot (2026-12-07 b): how stable is the prompt reference itself? The fp32 prompt against
the same prompt in bf16 and against the same concepts with the non-target profiles swapped.
Results in benchmarks/results/eval_grounded_pilot.txt. A research script:

    python -m benchmarks.grounded.pilot_floor K N [MODEL]"""
import sys, json, random, statistics, time
from pathlib import Path
import torch
from personalkv.config import get_settings
from personalkv.evaluation.grounded import with_profiles, load_grounded, context_of
from personalkv.evaluation.qa import Harness, mc_question, orders, kl_divergence, option_logprobs, option_score, _best
from personalkv.evaluation.dataset import load_dataset
from personalkv.kv.conversation import ConversationKV
from personalkv.kv.engine import GenerationOptions
torch.set_num_threads(2)
K = int(sys.argv[1]); NQ = int(sys.argv[2]); MODEL = sys.argv[3] if len(sys.argv) > 3 else "qwen2.5-0.5b"
settings = get_settings()
ds = load_dataset("../shared/data/yollava")
questions = [json.loads(l) for l in Path("benchmarks/grounded/yollava.jsonl").read_text().splitlines() if l.strip()]
def harness(dtype):
    s = settings.model_copy(deep=True); s.model.dtype = dtype
    h = Harness(MODEL, ds, [], log=lambda *a: None); h.setup(s); return h
hs = {"fp32": harness("float32"), "bf16": harness("bfloat16")}
items = load_grounded(ds, questions, hs["fp32"].texts, 2)[:NQ]
cids = [c.concept_id for c in ds.concepts]
def pick(h, it, order, ctx):
    conv = ConversationKV()
    st = conv.begin_turn(h.adapter, [], "".join(h.texts[c] for c in ctx) + mc_question(it, order, "text"),
                         options=GenerationOptions(max_new_tokens=0, recompute_ratio=0.0))
    toks = option_logprobs(h.adapter, conv.ctx, st.logits, [h.adapter.tokenize(o) for o in it.options])
    return _best([option_score(t) for t in toks]), st.logits.float().cpu()
same = {"bf16": [], "reorder_others": [], "newline_sep": []}; kls = {k: [] for k in same}
for it in items:
    for order in orders(it):
        ctx = context_of(it, cids, K, True)
        p0, l0 = pick(hs["fp32"], it, order, ctx)
        p, l = pick(hs["bf16"], it, order, ctx); same["bf16"].append(p == p0); kls["bf16"].append(kl_divergence(l0, l))
        # the others swapped, the target where it was
        t = ctx.index(it.concept_id); others = [c for c in ctx if c != it.concept_id][::-1]; others.insert(t, it.concept_id)
        p, l = pick(hs["fp32"], it, order, others); same["reorder_others"].append(p == p0); kls["reorder_others"].append(kl_divergence(l0, l))
print(f"K={K} pairs={len(same['bf16'])}")
for k in ("bf16", "reorder_others"):
    print(f"prompt fp32 vs {k:16s} same {sum(same[k])}/{len(same[k])} KL mean {statistics.mean(kls[k]):.4f} median {statistics.median(kls[k]):.4f}")
