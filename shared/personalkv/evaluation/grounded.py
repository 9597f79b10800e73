"""`personalkv eval grounded DATASET --questions FILE`: does placed evidence make answers right,
and does it keep each fact bound to its concept across independently computed chunks?

The questions are *grounded*: the right option is stated in the concept's profile, the wrong one
is a fact of the same kind from another concept's profile (``distractor``). The project's sets
live in ``benchmarks/grounded/`` (with the rules they obey); any dataset's own ``text_mc``
questions can be filtered to the grounded ones by ``is_grounded`` (the explicit rule).

Conditions, every question in both option orders, scored by option text likelihood (the
``eval qa`` scoring: mean log-probability per token of each option's text as the answer, one
masked forward over the question's cache, summed over both orders per question):

  none         the question alone
  prompt1      the concept's profile in the prompt;  placed1  its chunk placed
  prompt3      the target among 2 other concepts;    placed3  the same chunks placed
  bind3        the target, the concept the wrong option comes from and one other: the model must
               attach each fact to the right concept across chunks computed apart
  bind10       the same with 8 others (10 concepts in the context)

Each placed condition is compared with its prompt counterpart (same concepts, same order, same
tokens): accuracy, McNemar (exact) against the prompt and against ``none``, KL(prompt || placed)
of the first answer token's distribution, identical picks per (question, order), TTFT (place +
recompute + prefill: chunks come from the hot-chunk cache in serving) and the share of evidence
tokens recomputed. The pieces are the product's: ``Harness`` (the pipeline's profile chunk
evidence, encode, the stored chunk round trip) and ``ConversationKV.begin_turn``.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from personalkv.evaluation.qa import (
    Harness, Item, _best, _per_question, _speak, is_grounded, kl_divergence, mc_question, mcnemar_exact,
    option_logprobs, option_score, orders, wilson,
)

#: context sizes of the multi-concept conditions; the binding ones hold the distractor's concept
MULTI = (("3", 3, False), ("bind3", 3, True), ("bind10", 10, True))


# --- questions ----------------------------------------------------------------------------
def with_profiles(dataset, profiles: dict | None):
    """The dataset with the facts of ``profiles`` ({id: {"category", "info"}}) as its concepts'
    profiles (for datasets that ship none, e.g. MyVLM)."""
    if not profiles:
        return dataset
    concepts = tuple(replace(c, category=profiles[c.concept_id].get("category", c.category),
                             info=profiles[c.concept_id].get("info", c.info))
                     if c.concept_id in profiles else c for c in dataset.concepts)
    return type(dataset)(dataset.root, concepts, dataset.negatives, dataset.questions)


def load_grounded(dataset, questions: list[dict], profile_texts: dict[str, str],
                  per_concept_max: int | None = None) -> list[Item]:
    """Two-option ``text_mc`` questions that pass ``is_grounded`` against the profile chunk's
    text (the user's facts as the chunk states them), with their distractor concept; at most
    ``per_concept_max`` per concept (the first ones), so that a smaller run still covers every
    concept."""
    names = {c.concept_id: c.name for c in dataset.concepts}
    items, per_concept = [], {}
    for q in questions:
        if q.get("kind") != "text_mc" or q.get("concept") not in names or len(q.get("options", {})) != 2:
            continue
        letters = sorted(q["options"])
        options = tuple(_speak(str(q["options"][k]), names) for k in letters)
        answer = letters.index(q["answer"])
        if not is_grounded(options[answer], options[1 - answer], profile_texts[q["concept"]]):
            continue
        distractor = q.get("distractor_concept")
        n = per_concept.get(q["concept"], 0)
        if per_concept_max is not None and n >= per_concept_max:
            continue
        items.append(Item(concept_id=q["concept"], index=n, question=_speak(q["question"], names),
                          options=options, answer=answer,
                          distractor=distractor if distractor in names and distractor != q["concept"] else None))
        per_concept[q["concept"]] = n + 1
    return items


def context_of(item: Item, concept_ids: list[str], k: int, binding: bool, seed: int = 0) -> list[str]:
    """``k`` concepts: the target, with ``binding`` the distractor's concept, and random others,
    in a random order (seeded per question: every condition of one question sees the same)."""
    rng = random.Random(f"{seed}:{k}:{binding}:{item.concept_id}:{item.index}")
    fixed = [item.concept_id] + ([item.distractor] if binding and item.distractor else [])
    others = [c for c in concept_ids if c not in fixed]
    picked = fixed + rng.sample(others, min(k - len(fixed), len(others)))
    rng.shuffle(picked)
    return picked


# --- conditions ---------------------------------------------------------------------------
@dataclass(frozen=True)
class GroundedCondition:
    name: str
    mode: str  # none | prompt | placed
    context: str = ""  # "", "1", "3", "bind3", "bind10"
    k: int = 0
    binding: bool = False
    ratio: float = 0.0
    strategy: str = "query"
    quantization: str = "none"  # the stored chunks' encoding (``Harness.begin`` reads it)

    @property
    def counterpart(self) -> str | None:
        return f"prompt{self.context}" if self.mode == "placed" else None


def build_conditions(ratios, strategy: str, contexts=MULTI) -> list[GroundedCondition]:
    conds = [GroundedCondition("none", "none"),
             GroundedCondition("prompt1", "prompt", "1", 1),
             GroundedCondition("placed1", "placed", "1", 1)]
    for context, k, binding in contexts:
        conds.append(GroundedCondition(f"prompt{context}", "prompt", context, k, binding))
        for ratio in ratios:
            conds.append(GroundedCondition(f"placed{context}_r{ratio:g}", "placed", context, k, binding,
                                           ratio, strategy))
    return conds


@dataclass
class Answer:
    option_scores: list[float]  # per option (dataset order): mean log-prob per token
    logits: torch.Tensor | None  # first answer token's logits; dropped once compared
    ttft: float
    recomputed: int
    evidence_tokens: int

    @property
    def pick(self) -> int:
        return _best(self.option_scores)


def answer(harness: Harness, item: Item, order, cond: GroundedCondition, evidence: list[str]) -> Answer:
    """One (question, order) under one condition: the text question's state after the engine's
    first turn, the options' likelihoods over it."""
    conversation, started = harness.begin(mc_question(item, order, "text"), cond, evidence)
    tokens = option_logprobs(harness.adapter, conversation.ctx, started.logits, harness.option_ids[item])
    evidence_tokens = sum(harness.chunks[c, "none"].meta.token_count for c in evidence)
    return Answer(option_scores=[option_score(t) for t in tokens], logits=started.logits.float().cpu(),
                  ttft=sum(started.timings[s] for s in ("place", "recompute", "prefill")),
                  recomputed=started.recomputed_tokens, evidence_tokens=evidence_tokens)


def evaluate_grounded(dataset_path, model: str, settings, *, questions_path=None, profiles_path=None,
                      ratios=None, max_questions: int | None = None, per_concept: int | None = None, seed: int = 0, threads: int | None = None,
                      log=print) -> dict:
    """Every condition on every grounded question; returns the report (``summarize``)."""
    from personalkv.evaluation.dataset import load_dataset

    if threads:
        torch.set_num_threads(threads)
    default_ratio, strategy = settings.model.recompute_ratio, settings.model.recompute_strategy
    ratios = sorted(set(ratios or ()) | {default_ratio})
    profiles = json.loads(Path(profiles_path).read_text()) if profiles_path else None
    dataset = with_profiles(load_dataset(dataset_path), profiles)
    questions = ([json.loads(line) for line in Path(questions_path).read_text().splitlines() if line.strip()]
                 if questions_path else list(dataset.questions))
    t0 = time.perf_counter()
    harness = Harness(model, dataset, [], log=log)
    harness.setup(settings)
    items = load_grounded(dataset, questions, harness.texts, per_concept)[:max_questions]
    if not items:
        raise ValueError("no grounded two-option text_mc questions (see is_grounded)")
    harness.option_ids = {item: [harness.adapter.tokenize(o) for o in item.options] for item in items}
    concept_ids = [c.concept_id for c in dataset.concepts]
    conds = build_conditions(ratios, strategy)
    log(f"[eval grounded] {harness.adapter.name}: {len(items)} questions x 2 orders, {len(conds)} conditions, "
        f"setup {time.perf_counter() - t0:.0f}s")
    pairs = [(item, order) for item in items for order in orders(item)]
    answers: dict[str, list[Answer]] = {c.name: [] for c in conds}
    kl: dict[str, list[float]] = {c.name: [] for c in conds if c.counterpart}
    for n, (item, order) in enumerate(pairs):
        for cond in conds:
            if cond.k == 0:
                evidence = []
            elif cond.k == 1:
                evidence = [item.concept_id]
            else:
                evidence = context_of(item, concept_ids, cond.k, cond.binding, seed)
            answers[cond.name].append(answer(harness, item, order, cond, evidence))
        for cond in conds:
            if cond.counterpart:
                kl[cond.name].append(kl_divergence(answers[cond.counterpart][-1].logits, answers[cond.name][-1].logits))
        for cond in conds:
            answers[cond.name][-1].logits = None
        if (n + 1) % 10 == 0 or n + 1 == len(pairs):
            log(f"[eval grounded] {n + 1}/{len(pairs)} answered, {time.perf_counter() - t0:.0f}s")
    report = summarize(items, pairs, conds, answers, kl, default_ratio, strategy)
    report.update(dataset=str(dataset_path), questions_file=str(questions_path or ""), model=model,
                  model_fingerprint=harness.adapter.fingerprint(), threads=torch.get_num_threads(),
                  seconds=round(time.perf_counter() - t0, 1),
                  with_distractor=sum(1 for i in items if i.distractor))
    return report


# --- report -------------------------------------------------------------------------------
def summarize(items, pairs, conds, answers, kl, default_ratio: float, strategy: str) -> dict:
    rows, correct = {}, {}
    for cond in conds:
        outs = answers[cond.name]
        # per question: the option with the higher score summed over both orders
        hits = _per_question(pairs, outs, lambda _order, out: out.option_scores)
        correct[cond.name] = hits
        low, high = wilson(sum(hits), len(hits))
        row = {"mode": cond.mode, "context": cond.context, "k": cond.k, "binding": cond.binding,
               "accuracy": sum(hits) / len(hits), "accuracy_ci95": [low, high],
               "accuracy_pairs": sum(o.pick == item.answer for (item, _), o in zip(pairs, outs)) / len(outs),
               "ttft_ms_median": round(1000 * statistics.median(o.ttft for o in outs), 2)}
        if cond.mode == "placed":
            ref = answers[cond.counterpart]
            evidence = sum(o.evidence_tokens for o in outs)
            row.update(recompute_ratio=cond.ratio, recompute_strategy=cond.strategy,
                       recomputed_share=sum(o.recomputed for o in outs) / evidence if evidence else 0.0,
                       kl_mean=statistics.mean(kl[cond.name]), kl_max=max(kl[cond.name]),
                       identical_answers=sum(r.pick == o.pick for r, o in zip(ref, outs)) / len(outs),
                       ttft_ratio_prompt_over_placed=round(
                           rows[cond.counterpart]["ttft_ms_median"] / row["ttft_ms_median"], 2),
                       mcnemar_vs_prompt=mcnemar_exact(hits, correct[cond.counterpart]))
        if cond.mode != "none":
            row["mcnemar_vs_none"] = mcnemar_exact(hits, correct["none"])
            row["lift_over_none"] = row["accuracy"] - rows["none"]["accuracy"]
        rows[cond.name] = row
    headline = {}
    for context in ["1"] + [c for c, _, _ in MULTI]:
        placed = "placed1" if context == "1" else f"placed{context}_r{default_ratio:g}"
        p, q = rows[f"prompt{context}"], rows[placed]
        headline[context] = {
            "prompt": p["accuracy"], "placed": q["accuracy"], "none": rows["none"]["accuracy"],
            "placed_minus_prompt": q["accuracy"] - p["accuracy"], "lift_over_none": q["lift_over_none"],
            "identical_answers": q["identical_answers"], "kl_mean": q["kl_mean"], "kl_max": q["kl_max"],
            "recomputed_share": q["recomputed_share"], "ttft_ratio_prompt_over_placed": q["ttft_ratio_prompt_over_placed"]}
    return {"conditions": rows, "headline": headline, "questions": len(items), "answers_per_condition": len(pairs),
            "default_recompute_ratio": default_ratio, "default_recompute_strategy": strategy}


def format_table(report: dict) -> str:
    lines = [f"{'condition':24s} {'acc':>6s} {'95% CI':>13s} {'vs none':>8s} {'KL mean':>9s} {'KL max':>9s} "
             f"{'same':>6s} {'recomp':>7s} {'TTFT ms':>8s} {'gain':>5s}"]
    for name, row in report["conditions"].items():
        ci = "[{:.2f}, {:.2f}]".format(*row["accuracy_ci95"])
        lift = f"{row['lift_over_none']:+.3f}" if "lift_over_none" in row else "-"
        kl_mean = f"{row['kl_mean']:.2e}" if "kl_mean" in row else "-"
        kl_max = f"{row['kl_max']:.2e}" if "kl_max" in row else "-"
        same = f"{row['identical_answers']:.3f}" if "identical_answers" in row else "-"
        share = f"{row['recomputed_share']:.3f}" if "recomputed_share" in row else "-"
        gain = f"{row['ttft_ratio_prompt_over_placed']:.2f}" if "ttft_ratio_prompt_over_placed" in row else "-"
        lines.append(f"{name:24s} {row['accuracy']:>6.3f} {ci:>13s} {lift:>8s} {kl_mean:>9s} {kl_max:>9s} "
                     f"{same:>6s} {share:>7s} {row['ttft_ms_median']:>8.1f} {gain:>5s}")
    lines.append("")
    for name, row in report["conditions"].items():
        for key in ("mcnemar_vs_prompt", "mcnemar_vs_none"):
            if key in row:
                t = row[key]
                lines.append(f"McNemar {name} {key[8:]}: {t['only_first_correct']} vs {t['only_second_correct']} "
                             f"discordant, p={t['p']:.3g}")
    return "\n".join(lines)


def write_png(report: dict, path: Path) -> Path:
    """Left: accuracy per condition with 95% intervals (none as a line). Right: per context, the
    share of answers identical to the prompt's and the mean KL at the default. Matplotlib (Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = report["conditions"]
    fig = Figure(figsize=(14, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    acc, same = fig.subplots(1, 2, width_ratios=(1.4, 1))
    fig.suptitle(f"Grounded QA: {report.get('model', '?')} on {Path(str(report.get('dataset', '?'))).name}, "
                 f"{report['questions']} questions x 2 orders; placed at r={report['default_recompute_ratio']:g} "
                 f"{report['default_recompute_strategy']}")
    names = list(rows)
    values = [rows[n]["accuracy"] for n in names]
    errors = [[v - rows[n]["accuracy_ci95"][0] for v, n in zip(values, names)],
              [rows[n]["accuracy_ci95"][1] - v for v, n in zip(values, names)]]
    colours = ["0.5" if rows[n]["mode"] == "none" else "tab:blue" if rows[n]["mode"] == "prompt" else "tab:orange"
               for n in names]
    acc.barh(range(len(names)), values, xerr=errors, color=colours, error_kw={"elinewidth": 1, "capsize": 2})
    acc.axvline(rows["none"]["accuracy"], color="0.5", linestyle=":", label="none (no evidence)")
    acc.set_yticks(range(len(names)), names)
    acc.invert_yaxis()
    acc.set_xlim(0, 1)
    acc.set_xlabel("accuracy (option text likelihood; 95% Wilson intervals)")
    acc.set_title("Accuracy: blue prompt, orange placed")
    acc.legend(loc="lower right")
    contexts = list(report["headline"])
    head = report["headline"]
    xs = range(len(contexts))
    same.bar([x - 0.2 for x in xs], [head[c]["identical_answers"] for c in contexts], 0.4, color="tab:green",
             label="identical answers (placed vs prompt)")
    same.set_ylim(0, 1.05)
    same.set_xticks(list(xs), [f"{c}\n{head[c]['recomputed_share']:.0%} recomp." for c in contexts], fontsize=8)
    same.set_ylabel("share of (question, order) pairs")
    kl = same.twinx()
    kl.bar([x + 0.2 for x in xs], [max(head[c]["kl_mean"], 1e-6) for c in contexts], 0.4, color="tab:red",
           label="mean KL (right axis, log)")
    kl.set_yscale("log")
    kl.set_ylabel("KL(prompt || placed), first answer token")
    same.set_title("Fidelity to the prompt per context (bind: the wrong option's concept in it)", fontsize=10)
    handles = same.get_legend_handles_labels()[0] + kl.get_legend_handles_labels()[0]
    same.legend(handles, [h.get_label() for h in handles], loc="upper center", bbox_to_anchor=(0.5, -0.08),
                ncol=2, fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
