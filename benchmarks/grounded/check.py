#!/usr/bin/env python3
"""Check the grounded two-option questions in this folder against the concept profiles.

Standalone, stdlib only. Usage:

    python3 benchmarks/grounded/check.py [--data /path/to/shared/data/yollava]

Profiles: Yo'LLaVA from <data>/concepts/<id>/profile.json (default: ../shared/data/yollava
beside the repository checkout); MyVLM from myvlm_profiles.json in this folder (the MyVLM
profiles in the dataset carry no facts). Prints one line per violation and a summary line
"N questions, M concepts, K violations"; exits 1 when there are violations.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data"

MIN_Q, MAX_Q = 3, 5
BALANCE_LO, BALANCE_HI = 0.40, 0.60
INFO_WORDS = (20, 45)
KEYS = {"concept", "kind", "grounded", "attribute", "question", "options", "answer", "fact",
        "distractor_concept"}


def norm(text: str) -> str:
    """Lowercase, trim and collapse whitespace."""
    return re.sub(r"\s+", " ", str(text)).strip().lower()


def profile_text(cid: str, prof: dict) -> str:
    """name + category + info, with the concept token replaced by its name."""
    name = prof.get("name") or cid
    info = (prof.get("info") or "").replace(f"<{cid}>", name)
    return norm(" ".join([name, prof.get("category") or "", info]))


def states(text: str, option: str) -> bool:
    """The option is stated in the profile: a case-insensitive substring that also starts and
    ends on word boundaries (so "red" is not found inside "colored"; "_" and "-" separate words)."""
    o = norm(option)
    return bool(o) and re.search(r"(?<![a-z0-9])" + re.escape(o) + r"(?![a-z0-9])", text) is not None


def mentions(text: str, option: str) -> bool:
    """Plain case-insensitive substring test (the strict test for the wrong option)."""
    o = norm(option)
    return bool(o) and o in text


def load_yollava(root: Path) -> dict:
    concepts = root / "concepts"
    if not concepts.is_dir():
        sys.exit(f"no concepts folder at {concepts}; pass --data")
    out = {}
    for d in sorted(concepts.iterdir()):
        p = d / "profile.json"
        if p.is_file():
            out[d.name] = json.loads(p.read_text())
    return out


def load_myvlm(path: Path, dataset_root: Path | None, errors: list) -> dict:
    raw = json.loads(path.read_text())
    out = {}
    for cid, prof in raw.items():
        where = f"{path.name}:{cid}"
        cat, info = (prof.get("category") or "").strip(), (prof.get("info") or "").strip()
        if not cat or len(cat.split()) > 2:
            errors.append(f"{where}: category must be one or two words, got {cat!r}")
        n = len(info.split())
        if not INFO_WORDS[0] <= n <= INFO_WORDS[1]:
            errors.append(f"{where}: info has {n} words, expected {INFO_WORDS[0]}-{INFO_WORDS[1]}")
        if f"<{cid}>" not in info:
            errors.append(f"{where}: info does not write the concept as <{cid}>")
        out[cid] = {"name": cid, "category": cat, "info": info}
    if dataset_root is not None and (dataset_root / "concepts").is_dir():
        real = {d.name for d in (dataset_root / "concepts").iterdir() if d.is_dir()}
        for cid in sorted(real - set(out)):
            errors.append(f"{path.name}: MyVLM concept {cid} has no profile")
        for cid in sorted(set(out) - real):
            errors.append(f"{path.name}: {cid} is not a MyVLM concept")
    return out


def check_file(path: Path, profiles: dict, errors: list) -> tuple[int, set]:
    texts = {cid: profile_text(cid, p) for cid, p in profiles.items()}
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((i, json.loads(line)))
        except json.JSONDecodeError as e:
            errors.append(f"{path.name}:{i}: not JSON ({e})")

    per_concept = defaultdict(list)
    letters = Counter()
    seen_q = set()
    for i, q in rows:
        where = f"{path.name}:{i}"
        missing = KEYS - set(q)
        if missing:
            errors.append(f"{where}: missing keys {sorted(missing)}")
            continue
        cid, dc = q["concept"], q["distractor_concept"]
        opts, ans = q["options"], q["answer"]
        if cid not in profiles:
            errors.append(f"{where}: unknown concept {cid!r}")
            continue
        per_concept[cid].append(q)
        if q["kind"] != "text_mc" or q["grounded"] is not True:
            errors.append(f"{where}: kind must be text_mc and grounded true")
        if not str(q["attribute"]).strip():
            errors.append(f"{where}: empty attribute")
        if not isinstance(opts, dict) or set(opts) != {"A", "B"} or ans not in ("A", "B"):
            errors.append(f"{where}: options must be A/B and answer A or B")
            continue
        letters[ans] += 1
        right, wrong = opts[ans], opts["B" if ans == "A" else "A"]
        if not norm(right) or not norm(wrong) or norm(right) == norm(wrong):
            errors.append(f"{where}: options empty or equal")
            continue
        if norm(q["fact"]) != norm(right):
            errors.append(f"{where}: fact {q['fact']!r} differs from the right option {right!r}")
        target = texts[cid]
        # right option stated in the target's profile
        if not states(target, right):
            errors.append(f"{where}: right option {right!r} not in the profile of {cid}")
        # the name alone must not give the answer away
        name = norm(re.sub(r"[-_]", " ", profiles[cid].get("name") or cid))
        if norm(right) in name:
            errors.append(f"{where}: right option {right!r} is given away by the name {name!r}")
        # wrong option from another concept of the same dataset, absent from the target
        if dc == cid:
            errors.append(f"{where}: distractor_concept is the concept itself")
        elif dc not in profiles:
            errors.append(f"{where}: distractor_concept {dc!r} is not in this dataset")
        elif not states(texts[dc], wrong):
            errors.append(f"{where}: wrong option {wrong!r} not in the profile of {dc}")
        if mentions(target, wrong):
            errors.append(f"{where}: wrong option {wrong!r} appears in the profile of {cid}")
        # question wording
        question = q["question"]
        tokens = re.findall(r"<([^<>]+)>", question)
        if tokens != [cid]:
            errors.append(f"{where}: question must name the concept once as <{cid}>, found {tokens}")
        qtext = norm(question.replace(f"<{cid}>", " "))
        for o in (right, wrong):
            if norm(o) in qtext:
                errors.append(f"{where}: question contains option text {o!r}")
        key = (cid, norm(question))
        if key in seen_q:
            errors.append(f"{where}: duplicate question for {cid}")
        seen_q.add(key)

    # coverage, counts per concept, distractor variety
    for cid in sorted(profiles):
        qs = per_concept.get(cid, [])
        if not MIN_Q <= len(qs) <= MAX_Q:
            errors.append(f"{path.name}: {cid} has {len(qs)} questions, expected {MIN_Q}-{MAX_Q}")
        dcs = {q["distractor_concept"] for q in qs}
        if len(qs) > 1 and len(dcs) < 2:
            errors.append(f"{path.name}: all distractors of {cid} come from {sorted(dcs)}")
    total = sum(letters.values())
    if total:
        share = letters["A"] / total
        if not BALANCE_LO <= share <= BALANCE_HI:
            errors.append(f"{path.name}: answer A share {share:.0%} outside "
                          f"{BALANCE_LO:.0%}-{BALANCE_HI:.0%}")
    distinct = {q["distractor_concept"] for qs in per_concept.values() for q in qs}
    if len(profiles) > 2 and len(distinct) < len(profiles) // 2:
        errors.append(f"{path.name}: only {len(distinct)} distinct distractor concepts")
    print(f"# {path.name}: {total} questions, {len(per_concept)} concepts, A={letters['A']} "
          f"B={letters['B']}, {len(distinct)} distinct distractor concepts")
    return total, set(per_concept)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA / "yollava",
                    help="Yo'LLaVA dataset folder (with concepts/<id>/profile.json)")
    ap.add_argument("--myvlm-data", type=Path, default=DEFAULT_DATA / "myvlm",
                    help="MyVLM dataset folder, only used to check that every concept has a "
                         "profile (skipped when absent)")
    ap.add_argument("--dir", type=Path, default=HERE, help="folder with the question files")
    args = ap.parse_args()

    errors: list[str] = []
    yollava = load_yollava(args.data)
    myvlm = load_myvlm(args.dir / "myvlm_profiles.json", args.myvlm_data, errors)
    n_q = n_c = 0
    for fname, profiles in (("yollava.jsonl", yollava), ("myvlm.jsonl", myvlm)):
        q, c = check_file(args.dir / fname, profiles, errors)
        n_q += q
        n_c += len(c)
    for e in errors:
        print(e)
    print(f"{n_q} questions, {n_c} concepts, {len(errors)} violations")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
