"""Issue 28 pilot (2026-12-07 b): stitched chunks that carry their neighbours. Results in
benchmarks/results/eval_grounded_pilot.txt. A research script (needs ../shared/data and the model):

    python -m benchmarks.grounded.pilot_binding K N VARIANTS [MODEL]   # e.g. 3 15 iso:0,linked:0.1

Variants (name:recompute ratio): iso (the product's chunks), linked (each chunk encoded after the
one placed before it), linked2 (after the two before it), anchor / anchor2 (after one / two
content-free profiles), exact (after every chunk before it: a sanity check, KL 0)."""
import sys, time, json, statistics
from dataclasses import replace
from pathlib import Path
import torch
from personalkv.config import get_settings as load_settings  # noqa: I001
from personalkv.evaluation.grounded import (with_profiles, load_grounded, context_of, GroundedCondition)
from personalkv.evaluation.qa import Harness, mc_question, orders, kl_divergence, option_logprobs, option_score, _best
from personalkv.evaluation.dataset import load_dataset
from personalkv.kv.chunk import KVChunk
from personalkv.kv.conversation import ConversationKV
from personalkv.kv.engine import GenerationOptions

torch.set_num_threads(2)
K = int(sys.argv[1]); NQ = int(sys.argv[2]); variants = sys.argv[3].split(",")
MODEL = sys.argv[4] if len(sys.argv) > 4 else "qwen2.5-0.5b"
settings = load_settings()
ds = with_profiles(load_dataset("../shared/data/yollava"), None)
questions = [json.loads(l) for l in Path("benchmarks/grounded/yollava.jsonl").read_text().splitlines() if l.strip()]
h = Harness(MODEL, ds, [], log=lambda *a: None); h.setup(settings)
items = load_grounded(ds, questions, h.texts, 2)[:NQ]
h.option_ids = {it: [h.adapter.tokenize(o) for o in it.options] for it in items}
ad = h.adapter
cids = [c.concept_id for c in ds.concepts]
prefix = ad.system_prefix()

def encode_after(context_texts, cid):
    """cid's chunk computed after the system prefix + context_texts (kept: cid's tokens only)."""
    own = h.chunks[cid, "none"]
    seg = ad.build_segment([*context_texts, h.texts[cid]])
    with torch.inference_mode():
        pos, ext = ad.segment_positions(seg, prefix.extent)
        cache = ad.new_cache(list(zip(prefix.keys, prefix.values)))
        ad.run_decoder(ad.embed(seg.token_ids, None), pos, cache)
        n = own.meta.token_count
        assert torch.equal(seg.token_ids[-n:], own.token_ids), "tokenization differs"
        kv = [ad.cache_kv(cache, l) for l in range(ad.num_layers)]
        keys = [k[0, :, -n:, :].clone() for k, _ in kv]; values = [v[0, :, -n:, :].clone() for _, v in kv]
    start = int(pos[0, -n])
    meta = replace(own.meta, start_position=start, position_extent=start + own.meta.position_span)
    return KVChunk(meta=meta, keys=keys, values=values, positions=pos[:, -n:].cpu(), token_ids=own.token_ids,
                   salience=own.salience)

_anchored = {}
def cache_anchor(variant, c, pre):
    if (variant, c) not in _anchored:
        _anchored[variant, c] = encode_after(pre, c)
    return _anchored[variant, c]
def chunks_for(variant, ctx):
    if variant == "iso":
        return [h.chunks[c, "none"] for c in ctx]
    out = []
    for j, c in enumerate(ctx):
        if variant == "linked":
            pre = [h.texts[ctx[j - 1]]] if j else []
        elif variant == "linked2":
            pre = [h.texts[x] for x in ctx[max(0, j - 2):j]]
        elif variant == "anchor":
            pre = ["Sam is my thing.\n"]
        elif variant == "anchor2":
            pre = ["Sam is my thing. It is small.\n", "Alex is my friend. Alex is tall.\n"]
        elif variant == "exact":
            pre = [h.texts[x] for x in ctx[:j]]
        else:
            raise ValueError(variant)
        out.append(encode_after(pre, c) if pre else h.chunks[c, "none"]) if variant.startswith('linked') or variant=='exact' else out.append(cache_anchor(variant, c, pre))
    return out

def run(q, chunks, text, ratio):
    conv = ConversationKV()
    opts = GenerationOptions(max_new_tokens=0, recompute_ratio=ratio, recompute_strategy="salience")
    st = conv.begin_turn(ad, chunks, (text or "") + q, options=opts)
    return conv, st

res = {}
t0 = time.time()
for it in items:
    for order in orders(it):
        q = mc_question(it, order, "text")
        ctx = context_of(it, cids, K, True)
        def score(conv, st):
            toks = option_logprobs(ad, conv.ctx, st.logits, h.option_ids[it])
            return _best([option_score(t) for t in toks]), st.logits.float().cpu()
        pp, pl = score(*run(q, [], "".join(h.texts[c] for c in ctx), 0.0))
        res.setdefault("prompt", []).append(pp == it.answer)
        for v in variants:
            name, r = v.split(":"); r = float(r)
            p, l = score(*run(q, chunks_for(name, ctx), None, r))
            d = res.setdefault(v, {"kl": [], "same": [], "right": []})
            d["kl"].append(kl_divergence(pl, l)); d["same"].append(p == pp); d["right"].append(p == it.answer)
print(f"K={K} pairs={len(res['prompt'])} prompt acc {sum(res['prompt'])/len(res['prompt']):.3f}  {time.time()-t0:.0f}s")
for v in variants:
    d = res[v]
    print(f"{v:14s} KL mean {statistics.mean(d['kl']):.4f} median {statistics.median(d['kl']):.4f} max {max(d['kl']):.3f} "
          f"same {sum(d['same'])}/{len(d['same'])} acc {sum(d['right'])/len(d['right']):.3f}")
