"""`personalkv eval grounded`: the grounding rule, the binding contexts, and the harness run end to
end on a synthetic dataset with a tiny random-weight model (one placed chunk and a full recompute
equal the prompt; placing several apart does not)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from personalkv.cli import main
from personalkv.config import get_settings
from personalkv.evaluation.dataset import load_dataset
from personalkv.evaluation.grounded import (
    MULTI, build_conditions, context_of, evaluate_grounded, is_grounded, load_grounded, with_profiles,
)
from personalkv.evaluation.qa import Item

EXACT_KL = 1e-6  # fp32: placed and prompt differ only by float reordering (KL ~1e-12 seen)
REPO = Path(__file__).resolve().parents[3]


def test_the_rule_needs_the_right_option_in_the_profile_as_whole_words_and_not_the_wrong_one():
    profile = "Rex is my dog. He is a Shiba Inu with a black collar."
    assert is_grounded("Shiba inu", "Corgi", profile)
    assert is_grounded("black collar", "red collar", profile)
    assert not is_grounded("Corgi", "Shiba Inu", profile)  # right option not stated
    assert not is_grounded("black collar", "Shiba Inu", profile)  # both stated: not decidable
    assert not is_grounded("red", "blue", "A reddish cup.")  # whole words only: "red" is not "reddish"
    assert is_grounded("black", "white", "black-and-tan coat")  # punctuation separates words


def test_binding_contexts_hold_the_target_and_the_distractor_in_varied_orders():
    concepts = [f"c{i}" for i in range(12)]
    firsts = set()
    for index in range(8):
        item = Item("c3", index, "q", ("x", "y"), 0, distractor="c7")
        for k in (3, 10):
            picked = context_of(item, concepts, k, binding=True)
            assert len(picked) == k == len(set(picked)) and {"c3", "c7"} <= set(picked)
            assert picked == context_of(item, concepts, k, binding=True)  # every condition sees the same
        plain = context_of(item, concepts, 3, binding=False)
        assert "c3" in plain and len(plain) == 3
        firsts.add(context_of(item, concepts, 3, binding=True).index("c3"))
    assert len(firsts) >= 2  # the target is not always first (where placement is exact)


def test_conditions_pair_every_placed_one_with_its_prompt():
    conds = build_conditions([0.1, 0.2], "query")
    names = {c.name for c in conds}
    for context, _, _ in MULTI:
        assert {f"prompt{context}", f"placed{context}_r0.1", f"placed{context}_r0.2"} <= names
    assert all(c.counterpart in names for c in conds if c.mode == "placed")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("grounded")
    facts = {"rex": ("dog", "<rex> is a brown dog with a black collar."),
             "bobo": ("mug", "<bobo> is a blue mug with a red star on the side."),
             "fern": ("plant", "<fern> is a fern in a terracotta pot."),
             "kiki": ("cat", "<kiki> is a grey cat with a white collar."),
             "tom": ("toy", "")}
    for cid, (category, info) in facts.items():
        (root / "concepts" / cid).mkdir(parents=True)
        (root / "concepts" / cid / "profile.json").write_text(
            json.dumps({"name": cid.title(), "category": category, "info": info}))
    questions = [
        ("rex", "What colour is <rex>'s collar?", "black collar", "white collar", "kiki"),
        ("bobo", "What is on the side of <bobo>?", "red star", "black collar", "rex"),
        ("kiki", "What colour is <kiki>?", "grey", "blue", "bobo"),
        ("fern", "What is <fern> planted in?", "terracotta pot", "blue mug", "bobo"),
        ("fern", "What colour is <fern>?", "green", "blue", "bobo"),  # not in the profile: dropped
        ("tom", "What is <tom>?", "toy", "mug", "bobo"),  # grounded through the category
    ]
    lines = [json.dumps({"concept": c, "kind": "text_mc", "question": q,
                         "options": {"A": right, "B": wrong} if i % 2 == 0 else {"A": wrong, "B": right},
                         "answer": "A" if i % 2 == 0 else "B", "distractor_concept": d})
             for i, (c, q, right, wrong, d) in enumerate(questions)]
    path = root / "grounded.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return root, path


def test_grounded_questions_are_loaded_by_the_rule_with_their_distractor(dataset):
    from personalkv.evaluation.qa import Harness

    root, path = dataset
    data = load_dataset(root)
    harness = Harness("tiny:causal_lm", data, [], log=lambda *_: None)
    harness.setup(get_settings())
    questions = [json.loads(line) for line in path.read_text().splitlines()]
    items = load_grounded(data, questions, harness.texts)
    assert [i.concept_id for i in items] == ["rex", "bobo", "kiki", "fern", "tom"]
    assert items[0].question == "What colour is Rex's collar?" and items[0].distractor == "kiki"
    assert all(i.options[i.answer] != i.options[1 - i.answer] for i in items)


def test_profiles_file_supplies_the_facts_of_a_dataset_without_them(dataset):
    root, _ = dataset
    data = with_profiles(load_dataset(root), {"tom": {"category": "robot", "info": "<tom> is a tin robot."}})
    tom = data.concept("tom")
    assert tom.category == "robot" and tom.info == "<tom> is a tin robot."
    assert data.concept("rex").info == "<rex> is a brown dog with a black collar."


@pytest.mark.slow
def test_eval_grounded_end_to_end_exact_where_it_must_be(dataset, tmp_path):
    root, path = dataset
    report = evaluate_grounded(root, "tiny:causal_lm", get_settings(), questions_path=path, ratios=[0.0, 1.0],
                               log=lambda *_: None)
    rows = report["conditions"]
    assert report["questions"] == 5 and report["answers_per_condition"] == 10
    # One chunk placed is the prompt, to float reordering; so is recomputing every token.
    assert rows["placed1"]["kl_max"] <= EXACT_KL and rows["placed1"]["identical_answers"] == 1.0
    for context, _, _ in MULTI:
        assert rows[f"placed{context}_r1"]["kl_max"] <= EXACT_KL
        assert rows[f"placed{context}_r1"]["accuracy"] == rows[f"prompt{context}"]["accuracy"]
        assert rows[f"placed{context}_r1"]["recomputed_share"] > 0.5
        assert rows[f"placed{context}_r0"]["recomputed_share"] == 0.0
    # Chunks computed apart miss each other: measurably different from the prompt.
    assert rows["placedbind3_r0"]["kl_mean"] > 100 * EXACT_KL
    default = get_settings().model.recompute_ratio
    assert report["headline"]["bind10"]["kl_mean"] == rows[f"placedbind10_r{default:g}"]["kl_mean"]
    for name, row in rows.items():
        low, high = row["accuracy_ci95"]
        assert 0 <= low <= row["accuracy"] <= high <= 1
        if name != "none":
            assert row["mcnemar_vs_none"]["p"] <= 1
    out, png = tmp_path / "g.json", tmp_path / "g.png"
    assert main(["eval", "grounded", str(root), "--questions", str(path), "--model", "tiny:causal_lm",
                 "--per-concept", "1", "--json", str(out), "--png", str(png)]) == 0
    assert json.loads(out.read_text())["questions"] == 5  # rex, bobo, kiki, fern (its first), tom
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_shipped_question_sets_obey_their_rules():
    """benchmarks/grounded/check.py passes on the committed sets (the Yo'LLaVA profiles are read
    from ../shared/data when present; without them only the MyVLM set, whose facts ship)."""
    import subprocess
    import sys

    data = REPO.parent / "shared" / "data"
    if not (data / "yollava").is_dir():
        pytest.skip("../shared/data is not here")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "grounded" / "check.py"), "--data", str(data / "yollava")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert " 0 violations" in proc.stdout
