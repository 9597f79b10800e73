"""`personalkv eval qa` on a synthetic dataset with a tiny random-weight model: the harness runs
every condition through the product's pieces, and its exactness figures hold where they must
(one placed chunk and full recompute equal the prompt; pure reuse of three does not)."""

from __future__ import annotations

import json

import pytest

from personalkv.cli import main
from personalkv.config import get_settings
import torch

from personalkv.evaluation.qa import (Condition, Item, Outcome, context_concepts, evaluate, mcnemar_exact,
                                       option_logprobs, option_score, placed_name, summarize, wilson)

EXACT_KL = 1e-6  # fp32: placed and prompt differ only by float reordering (KL ~1e-12 seen)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("qa")
    facts = {
        "rex": ("dog", "<rex> is a brown dog with a black collar."),
        "bobo": ("mug", "<bobo> is a blue mug with a red star on the side."),
        "fern": ("plant", "<fern> is a fern in a terracotta pot; water it every Sunday."),
        "kiki": ("cat", ""),
    }
    lines = []
    for cid, (category, info) in facts.items():
        (root / "concepts" / cid).mkdir(parents=True)
        (root / "concepts" / cid / "profile.json").write_text(
            json.dumps({"name": cid.title(), "category": category, "info": info}))
        for i, (question, a, b, answer) in enumerate([
            (f"Is <{cid}> a {category}?", "Yes", "No", "A"),
            (f"What colour is <{cid}>?", "Green", "Brown", "B"),
        ]):
            lines.append(json.dumps({"concept": cid, "image": None, "split": "test", "kind": "text_mc",
                                     "question": question, "options": {"A": a, "B": b}, "answer": answer}))
        lines.append(json.dumps({"concept": cid, "image": None, "split": "test", "kind": "open_vqa",
                                 "question": "Describe it.", "answer": "something"}))
    (root / "questions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_eval_qa_conditions_and_exactness(dataset):
    report = evaluate(dataset, "tiny:causal_lm", get_settings(), ratios=(0.0, 0.3, 1.0), big_tokens=120, big_pieces=4,
                      big_questions=1, log=lambda *_: None)
    rows = report["conditions"]
    assert report["questions"] == 8 and report["answers_per_condition"] == 16  # text_mc only, 2 orders
    # prompt1 and prompt3 per question, prompt4 once: prompt tokens = chunk tokens + question
    assert report["prompt_tokens_match"] == "17/17"
    assert {"none", "prompt1", "placed1", "placed1_int8", "prompt3", "placed3_r0", "placed3_r0.3_deviation",
            "placed3_r0.3_first", "placed3_r1", "prompt4", "placed4_r0", "placed4_r1"} <= set(rows)
    # One chunk placed is the prompt, to float reordering; so is recomputing every token.
    assert report["placed_vs_prompt_identical"] == 1.0
    assert report["placed_vs_prompt_max_kl"] <= EXACT_KL
    assert rows["placed3_r1"]["kl_max"] <= EXACT_KL and rows["placed4_r1"]["kl_max"] <= EXACT_KL
    # Three chunks computed apart miss each other: measurably different from the prompt.
    assert rows["placed3_r0"]["kl_mean"] > 100 * EXACT_KL
    model = get_settings().model  # the headline figures are at the shipped default
    default3 = placed_name(3, model.recompute_ratio, model.recompute_strategy)
    assert report["placed3_kl_mean"] == rows[default3]["kl_mean"]
    for key, name in (("none", "none"), ("prompt1", "prompt1"), ("placed1", "placed1"), ("prompt3", "prompt3"),
                      ("placed3", default3)):
        assert report[f"accuracy_{key}"] == rows[name]["accuracy_likelihood"]
        assert report[f"accuracy_letter_{key}"] == rows[name]["accuracy_letter_calibrated"]
        low, high = report[f"accuracy_{key}_ci95"]
        assert 0 <= low <= report[f"accuracy_{key}"] <= high <= 1
    for name in ("none", "prompt1", "placed3_r0.3_first"):
        row = rows[name]
        low, high = row["accuracy_letter_ci95"]
        assert 0 <= low <= row["accuracy_letter"] <= high <= 1 and row["answers"] == 16
        assert 0 <= row["accuracy_letter_calibrated"] <= 1 and 0 <= row["accuracy_likelihood_sum"] <= 1
    assert rows["prompt4"]["answers"] == 1 and "accuracy_likelihood" not in rows["prompt4"]  # timing only
    # Full recompute is the prompt: the option texts score alike, so the picks agree per question.
    assert rows["placed3_r1"]["accuracy_likelihood"] == rows["prompt3"]["accuracy_likelihood"]
    # The sweep: every multi-chunk full-precision placed condition, nothing else.
    assert sorted(r["condition"] for r in report["sweep"]) == sorted(
        n for n, row in rows.items() if row["mode"] == "placed" and row["k"] > 1 and row["quantization"] == "none")
    assert {(r["chunks"], r["ratio"]) for r in report["sweep"]} == {(k, r) for k in (3, 4)
                                                                  for r in (0.0, 0.3, 1.0, model.recompute_ratio)}
    assert report["big_evidence_tokens"] >= 120
    assert "placed1 vs prompt1" in report["mcnemar"]


def test_eval_qa_cli_writes_json_and_png(dataset, tmp_path):
    out, png = tmp_path / "qa.json", tmp_path / "qa.png"
    assert main(["eval", "qa", str(dataset), "--model", "tiny:causal_lm", "--max-concepts", "3",
                 "--max-questions", "1", "--ratios", "0", "1", "--strategies", "first",
                 "--big-tokens", "0", "--json", str(out), "--png", str(png)]) == 0
    report = json.loads(out.read_text())
    for key in ("placed_vs_prompt_identical", "placed_vs_prompt_max_kl", "placed3_kl_mean",
                "placed3_identical", "ttft_ratio_prompt3_over_placed3"):
        assert key in report
    assert report["questions"] == 3
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_statistics():
    low, high = wilson(0, 10)
    assert low == 0 and abs(high - 0.2775) < 1e-3
    low, high = wilson(5, 10)
    assert abs(low - 0.2366) < 1e-3 and abs(high - 0.7634) < 1e-3
    # Exact McNemar: 6 discordant pairs all one way, p = 2 / 2**6.
    assert mcnemar_exact([True] * 6 + [False] * 4, [False] * 6 + [False] * 4)["p"] == pytest.approx(0.03125)
    assert mcnemar_exact([True, False], [True, False])["p"] == 1.0


def test_k_contexts_place_the_target_at_varied_positions():
    concepts = ["a", "b", "c", "d", "e"]
    positions = set()
    for index in range(6):
        item = Item("c", index, "q", ("x", "y"), 0)
        picked = context_concepts(item, concepts, 3)
        assert len(picked) == 3 == len(set(picked)) and picked[index % 3] == "c"
        positions.add(picked.index("c"))
    assert positions == {0, 1, 2}


# --- option text likelihood -------------------------------------------------------------------
LIKELIHOOD_TOL = 1e-4  # log-probabilities, fp32 tiny random weights: float reordering ~1e-6 seen


@pytest.mark.parametrize("kind", ["causal_lm", "qwen2_vl"])
def test_option_logprobs_equal_a_full_prompt_forward(tiny, kind):
    """Each option scored from the question's cache (all options in one forward, block mask)
    gets the log-probabilities the model's own forward over prefix + question + option gives."""
    from personalkv.kv.conversation import ConversationKV
    from personalkv.kv.engine import GenerationOptions
    from personalkv.models.base import Segment

    adapter = tiny(kind)
    question = "Is Rex a dog?\nA. Yes\nB. No, a brown cat with a black collar\n" + "Answer with the letter."
    options = [adapter.tokenize("Yes"), adapter.tokenize("No, a brown cat with a black collar")]
    assert len(options[0]) < len(options[1])
    conversation = ConversationKV()
    started = conversation.begin_turn(adapter, [], question, options=GenerationOptions(max_new_tokens=0))
    scored = option_logprobs(adapter, conversation.ctx, started.logits, options)
    prefix = adapter.build_segment([adapter.system_prefix_text()])
    asked = adapter.build_segment(adapter.question_parts(question))
    for ids, got in zip(options, scored):
        logits = adapter.reference_forward([prefix, asked, Segment(token_ids=torch.tensor(ids))],
                                           logits_to_keep=len(ids) + 1)
        want = [float(row[t]) for row, t in zip(torch.log_softmax(logits[:-1], -1), ids)]
        assert len(got) == len(ids)
        assert max(abs(a - b) for a, b in zip(got, want)) <= LIKELIHOOD_TOL
    assert option_score(scored[1]) == pytest.approx(sum(scored[1]) / len(scored[1]))


def test_option_texts_are_scored_after_the_question_that_asks_for_a_text(dataset):
    """Issue 22: scored after "Answer with the letter", qwen2.5-0.5b's option texts followed its
    Yes/No prior whatever the evidence. The harness scores them from the state of the question
    that lists the options without letters and asks for the text; the letter and the KL stay
    on the letter question's state."""
    from personalkv.evaluation.dataset import load_dataset
    from personalkv.evaluation.qa import INSTRUCTIONS, Harness, load_items, mc_question
    from personalkv.kv.conversation import ConversationKV
    from personalkv.kv.engine import GenerationOptions

    data = load_dataset(dataset)
    items = load_items(data, max_concepts=3, max_questions=1)
    harness = Harness("tiny:causal_lm", data, items, log=lambda *_: None)
    harness.setup(get_settings())
    adapter, item, order = harness.adapter, items[0], (1, 0)
    asked = mc_question(item, order, "text")
    assert asked.endswith(INSTRUCTIONS["text"]) and "A. " not in asked and "B. " not in asked
    assert asked.index(item.options[1]) < asked.index(item.options[0])  # the presented order

    def prompt_state(question):
        conversation = ConversationKV()
        started = conversation.begin_turn(adapter, [], harness.texts[item.concept_id] + question,
                                          options=GenerationOptions(max_new_tokens=0))
        return conversation, started

    conversation, started = prompt_state(asked)
    want = option_logprobs(adapter, conversation.ctx, started.logits, harness.option_ids[item])
    conversation, lettered = prompt_state(mc_question(item, order))
    after_letter = option_logprobs(adapter, conversation.ctx, lettered.logits, harness.option_ids[item])
    spread = lambda a, b: max(abs(x - y) for u, v in zip(a, b) for x, y in zip(u, v))  # noqa: E731
    assert spread(want, after_letter) > 100 * LIKELIHOOD_TOL  # the two states are distinguishable
    for cond in (Condition("prompt1", "prompt", 1), Condition("placed1", "placed", 1, counterpart="prompt1")):
        out = harness.run(item, order, cond, [item.concept_id])
        assert spread(out.option_token_logprobs, want) <= LIKELIHOOD_TOL
        # the letter (and the logits the KL compares) come from the letter question
        assert torch.allclose(out.logits, lettered.logits.float(), atol=1e-4)


def test_accuracy_keys_are_option_likelihood_letters_beside_them():
    """Synthetic outcomes where the scorings disagree: the letter always says A (the first
    presented option), the right option is the longer one with the higher mean but lower sum
    log-probability. The headline keys must follow the mean likelihood, per question."""
    items = [Item(f"c{i}", 0, "q", ("short", "the longer right answer"), 1) for i in range(4)]
    pairs = [(item, order) for item in items for order in ((0, 1), (1, 0))]
    right = [[-3.0], [-1.0, -1.0, -1.5, -1.0]]  # means -3 vs -1.125; sums -3 vs -4.5

    def outcome(order):
        return Outcome(letter_logprobs=[-0.1, -3.0], option_token_logprobs=right, pick=order[0], argmax=0,
                       ttft=0.01)

    conds = [Condition("none", "none"), Condition("prompt1", "prompt", 1),
             Condition("placed1", "placed", 1, counterpart="prompt1"),
             Condition("placed1_int8", "placed", 1, "int8", counterpart="prompt1"),
             Condition("prompt3", "prompt", 3), Condition(placed_name(3, 0.1, "first"), "placed", 3, ratio=0.1,
                                                          strategy="first", counterpart="prompt3")]
    outcomes = {c.name: [outcome(order) for _, order in pairs] for c in conds}
    kl = {c.name: [0.0] * len(pairs) for c in conds if c.counterpart}
    report = summarize(items, pairs, conds, outcomes, kl, 0.1, "first", 3, 0)
    for key in ("none", "prompt1", "placed1", "prompt3", "placed3"):
        assert report[f"accuracy_{key}"] == 1.0  # by mean log-prob per token: always the right one
        assert report[f"accuracy_{key}_ci95"] == list(wilson(4, 4))  # per question: n = 4
        assert report[f"accuracy_letter_{key}"] == 0.0  # A in one order, B in the other: a tie, first wins
    row = report["conditions"]["none"]
    assert row["accuracy_letter"] == 0.5 and row["accuracy_likelihood_sum"] == 0.0
    assert row["accuracy_likelihood_pairs"] == 1.0
    assert [r["condition"] for r in report["sweep"]] == ["placed3_r0.1_first"]


def test_eval_qa_reports_grounded_questions_apart_by_the_rule(dataset):
    """Of the synthetic questions only "What colour is <rex>?" (Brown, in its profile; Green
    not) is answerable from a profile: ``is_grounded`` marks it, the rest are "other"."""
    report = evaluate(dataset, "tiny:causal_lm", get_settings(), ratios=(0.0,), strategies=("first",),
                      big_tokens=0, log=lambda *_: None)
    row = report["conditions"]["prompt1"]
    assert row["questions_grounded"] == 1 and row["questions_other"] == 7
    assert row["accuracy_likelihood_grounded"] in (0.0, 1.0)
    assert 0 <= row["accuracy_likelihood_other"] <= 1


def test_eval_qa_scores_a_context_as_large_as_the_timing_one(dataset):
    """Issue 28: `--k 10` (k equal to the many-chunk size) crashed in the headline with
    KeyError 'accuracy_likelihood': every k-concept condition is scored, whatever k."""
    report = evaluate(dataset, "tiny:causal_lm", get_settings(), ratios=(0.0,), strategies=("first",), k=4,
                      big_tokens=60, big_pieces=4, max_questions=1, log=lambda *_: None)
    rows = report["conditions"]
    assert "accuracy_likelihood" in rows["prompt4"] and "accuracy_likelihood" in rows["placed4_r0"]
    assert 0 <= report["accuracy_placed4"] <= 1
