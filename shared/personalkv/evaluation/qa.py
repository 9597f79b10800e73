"""`personalkv eval qa DATASET --model MODEL`: profile QA with placed KV chunks vs the profile in
the prompt, on the text_mc questions of any dataset in the shared format.

Every condition answers the same multiple-choice questions, each in both option orders:

  none           the question alone
  prompt1        the concept's profile text in the prompt (the RAP-style baseline)
  placed1        its stored profile chunk placed behind the system prefix (+ int8 variant)
  prompt3        the profiles of k=3 concepts in the prompt: the target among k-1 distractors,
                 at position (question index mod k)
  placed3 r, s   the same k chunks, computed independently, placed, with a share r of their
                 tokens recomputed by strategy s (+ int8 at the configured default)
  prompt10 /     timing only, at the kv-core benchmark's evidence size (~2,088 tokens in 10
  placed10       chunks of concatenated profiles): TTFT over r

The pieces are the product's own: ``load_adapter``, the pipeline's profile chunk evidence
(``profile_chunk_evidence``: the linearized profile the caching worker encodes), ``encode``,
``encode_chunk`` -> ``ChunkStore`` -> ``decode_chunk`` round trip and ``engine.answer``; the
prompt conditions put the very same profile text in the user's message and run
``engine.answer`` with no chunks.

Two scorings, each from the state its question asks for (the cache after that question's
prefill, over the same evidence):

* **option text likelihood** (the headline ``accuracy_*`` keys): how likely the model finds each
  option's *text* as its answer, after the question with its options listed without letters
  and the instruction to answer with the option's text (``mc_question(..., "text")``; after the
  letter instruction a model expects a letter, and the text's likelihood then follows its prior
  for "Yes" / "No", not the evidence: issue 22's qwen2.5-0.5b picked the same options with and
  without the profile). ``option_logprobs``: the assistant turn continues with the option's
  tokens, forwarded over the question's cache, never re-prefilling the evidence. The
  score is the mean log-probability per token: the options of one question differ in length
  ("Yes" vs "a red collar with a bell"), and a sum charges every extra token, so it prefers the
  shorter option whatever the evidence says (the length-normalised variant of lm-eval-harness's
  multiple-choice scoring); the sum is reported too (``accuracy_likelihood_sum``). A question's
  pick adds each option's score over both orders; per (question, order) pair it is
  ``accuracy_likelihood_pairs``.
* **letter** (``accuracy_letter*``): the log-probability of each option's letter as the answer's
  first token, after the question with lettered options and the letter instruction. Raw accuracy counts each (question, order) pair; the calibrated variant adds each
  option's letter log-probabilities over both orders, which cancels the model's prior for a
  letter. Small models answer "A" nearly always (and the Yo'LLaVA key is mostly "A"), so the
  letter measures letter bias more than knowledge: hence the text likelihood as the headline.

Accuracy has Wilson 95% intervals (per question for the per-question picks); conditions are
compared with exact McNemar tests on the paired per-question likelihood outcomes. Each
placed variant is compared with its prompt counterpart on the letter question's state:
KL(prompt || placed) of the full next-token distribution, identical option picked, identical
full-vocabulary argmax. TTFT (of the letter question) is the
engine's place + recompute + prefill time (chunks come from the hot-chunk cache in serving, so
their load is left out; the prompt side reuses the cached system prefix too).
"""

from __future__ import annotations

import math
import random
import re
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from personalkv.config import Settings
from personalkv.kv.masks import additive_mask
from personalkv.models.base import Segment

OPTION_LETTERS = "ABCDEFGH"
DEFAULT_RATIOS = (0.0, 0.05, 0.1, 0.15, 0.2, 1.0)  # issue 22's sweep, with none and all
#: per ``mc_question`` form: how the options are listed, and what the answer should be
INSTRUCTIONS = {"letter": "Answer with the letter of the correct option.",
                "text": "Answer with the correct option's text."}
EVAL_USER = "eval-qa"


# --- items --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    concept_id: str
    index: int  # the question's index within its concept
    question: str
    options: tuple[str, ...]  # in the dataset's order
    answer: int  # index into options
    #: the concept whose profile states the wrong option (grounded questions: ``evaluation.grounded``)
    distractor: str | None = None


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def is_grounded(right: str, wrong: str, profile: str) -> bool:
    """The rule that marks a question answerable from the profile: the right option's text
    (lower case, punctuation and repeated spaces dropped) occurs in the profile's text as whole
    words, and the wrong option's does not."""
    text = f" {_norm(profile)} "
    return f" {_norm(right)} " in text and f" {_norm(wrong)} " not in text


def _speak(text: str, names: dict[str, str]) -> str:
    """The dataset writes a concept as ``<id>``; the user would say its name."""
    for concept_id, name in names.items():
        text = text.replace(f"<{concept_id}>", name)
    return text


def load_items(dataset, max_concepts: int | None = None, max_questions: int | None = None) -> list[Item]:
    names = {c.concept_id: c.name for c in dataset.concepts}
    concepts = [c.concept_id for c in dataset.concepts][:max_concepts]
    items, per_concept = [], {}
    for q in dataset.questions:
        if q.get("kind") != "text_mc" or q.get("concept") not in concepts:
            continue
        n = per_concept.get(q["concept"], 0)
        if max_questions is not None and n >= max_questions:
            continue
        letters = sorted(q["options"])
        items.append(Item(
            concept_id=q["concept"], index=n, question=_speak(q["question"], names),
            options=tuple(_speak(str(q["options"][k]), names) for k in letters),
            answer=letters.index(q["answer"]),
        ))
        per_concept[q["concept"]] = n + 1
    return items


def orders(item: Item) -> list[tuple[int, ...]]:
    """The dataset's option order and its reverse (for two options: both orders)."""
    forward = tuple(range(len(item.options)))
    return [forward, forward[::-1]]


def mc_question(item: Item, order: tuple[int, ...], answer_with: str = "letter") -> str:
    """The question with its options in ``order``: lettered, asking for the letter; or, for
    ``answer_with="text"``, one per line without letters, asking for the option's text (the
    state the option texts are scored in: see the module docstring)."""
    if answer_with == "letter":
        listed = [f"{OPTION_LETTERS[i]}. {item.options[j]}" for i, j in enumerate(order)]
    else:
        listed = [f"- {item.options[j]}" for j in order]
    return "\n".join([item.question, *listed, INSTRUCTIONS[answer_with]])


def context_concepts(item: Item, concept_ids: list[str], k: int, seed: int = 0) -> list[str]:
    """The target among k-1 distractors drawn from the other concepts, at position index mod k."""
    others = [c for c in concept_ids if c != item.concept_id]
    rng = random.Random(f"{seed}:{item.concept_id}:{item.index}")
    picked = rng.sample(others, min(k - 1, len(others)))
    picked.insert(item.index % k, item.concept_id)
    return picked


# --- statistics ---------------------------------------------------------------------------
def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact(a: list[bool], b: list[bool]) -> dict:
    """Exact two-sided McNemar test (binomial on the discordant pairs)."""
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    n = only_a + only_b
    tail = sum(math.comb(n, i) for i in range(0, min(only_a, only_b) + 1)) / 2**n if n else 1.0
    return {"only_first_correct": only_a, "only_second_correct": only_b, "p": min(1.0, 2 * tail)}


def kl_divergence(reference: torch.Tensor, other: torch.Tensor) -> float:
    """KL(reference || other) of the next-token distributions, in float64."""
    p = torch.log_softmax(reference.double(), dim=-1)
    q = torch.log_softmax(other.double(), dim=-1)
    return max(0.0, float((p.exp() * (p - q)).sum()))


# --- conditions ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Condition:
    name: str
    mode: str  # none | prompt | placed
    k: int = 0
    quantization: str = "none"
    ratio: float = 0.0
    strategy: str = "deviation"
    counterpart: str | None = None  # the prompt condition a placed one is compared with
    #: the many-chunk conditions of the big evidence (``setup_big``): a few questions, TTFT only
    timing_only: bool = False

    @property
    def scored(self) -> bool:
        return not self.timing_only


def _ratio_name(ratio: float) -> str:
    return f"{ratio:g}"


def placed_name(k: int, ratio: float, strategy: str, quantization: str = "none") -> str:
    quant = "_int8" if quantization == "int8" else ""
    if ratio in (0.0, 1.0):  # no choice to make: none or all tokens
        return f"placed{k}{quant}_r{_ratio_name(ratio)}"
    return f"placed{k}{quant}_r{_ratio_name(ratio)}_{strategy}"


def build_conditions(k: int, ratios, strategies, default_ratio: float, default_strategy: str,
                     big_k: int) -> list[Condition]:
    conds = [
        Condition("none", "none"),
        Condition("prompt1", "prompt", 1),
        Condition("placed1", "placed", 1, counterpart="prompt1"),
        Condition("placed1_int8", "placed", 1, "int8", counterpart="prompt1"),
        Condition(f"prompt{k}", "prompt", k),
    ]
    seen = set()
    for kk in ([k, big_k] if big_k else [k]):
        if kk != k:
            conds.append(Condition(f"prompt{kk}", "prompt", kk, timing_only=True))
        # The grid, plus the configured default (the headline figures are taken there).
        grid = sorted({(r, st) for r in ratios for st in strategies} | {(default_ratio, default_strategy)})
        for ratio, strategy in grid:
            name = placed_name(kk, ratio, strategy)
            if name not in seen:
                seen.add(name)
                conds.append(Condition(name, "placed", kk, ratio=ratio, strategy=strategy,
                                       counterpart=f"prompt{kk}", timing_only=kk != k))
    conds.append(Condition(placed_name(k, default_ratio, default_strategy, "int8"), "placed", k, "int8",
                           default_ratio, default_strategy, counterpart=f"prompt{k}"))
    return conds


def option_logprobs(adapter, ctx, first_logits: torch.Tensor, options: list[list[int]]) -> list[list[float]]:
    """Per option, the log-probability of each of its tokens as the answer after the question:
    the answer's first token from ``first_logits`` (the question's prefill), the rest from one
    forward of every option over ``ctx``'s cache. Each option sits at the answer's first
    positions and sees the cache and its own earlier tokens only (a block-diagonal causal mask),
    which is what forwarding it alone on a copy of the cache gives, in one pass over the weights.
    The options' KV is appended to ``ctx.cache``: the context is spent afterwards."""
    kv_len = ctx.kv_length
    segments = [Segment(token_ids=torch.tensor(ids, dtype=torch.long)) for ids in options]
    positions = torch.cat([adapter.segment_positions(s, ctx.next_position)[0] for s in segments], dim=1)
    embeds = torch.cat([adapter.embed(s.token_ids, None) for s in segments], dim=1)
    n = embeds.shape[1]
    allowed = torch.zeros(n, kv_len + n, dtype=torch.bool, device=embeds.device)
    allowed[:, :kv_len] = True
    start = 0
    for ids in options:
        end = start + len(ids)
        allowed[start:end, kv_len + start:kv_len + end] = torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
        start = end
    with torch.inference_mode():
        hidden = adapter.run_decoder(embeds, positions, ctx.cache, additive_mask(allowed, embeds.dtype))
        following = torch.log_softmax(adapter.logits(hidden)[0].float(), -1)
    first = torch.log_softmax(first_logits.float(), -1)
    out, start = [], 0
    for ids in options:
        rows = [first] + [following[start + i] for i in range(len(ids) - 1)]
        out.append([float(row[token]) for row, token in zip(rows, ids)])
        start += len(ids)
    return out


def option_score(token_logprobs: list[float]) -> float:
    """An option's likelihood score: mean log-probability per token (see the module docstring)."""
    return sum(token_logprobs) / len(token_logprobs)


@dataclass
class Outcome:
    letter_logprobs: list[float]  # per position in the presented order
    #: per option (dataset order): each of its tokens' log-probability as the answer
    option_token_logprobs: list[list[float]]  # after the text question (``mc_question(..., "text")``)
    pick: int  # option index (dataset order) picked by the letter
    argmax: int  # full-vocabulary argmax token
    ttft: float
    logits: torch.Tensor | None = None  # kept only until compared with the counterpart


@dataclass
class Harness:
    """Loads the model, encodes and stores every concept's profile chunk, answers."""

    model: str
    dataset: object
    items: list[Item]
    k: int = 3
    seed: int = 0
    log: object = print
    adapter: object = None
    texts: dict = field(default_factory=dict)
    evidence: dict = field(default_factory=dict)
    chunks: dict = field(default_factory=dict)  # (concept, quantization) -> KVChunk

    def setup(self, settings) -> None:
        from personalkv.kv.codec import decode_chunk, encode_chunk
        from personalkv.kv.engine import encode
        from personalkv.mining.profile import ProfileWriter
        from personalkv.models import load_adapter
        from personalkv.kv.evidence import profile_chunk_evidence
        from personalkv.storage.chunk_store import ChunkStore

        m = settings.model
        self.adapter = load_adapter(self.model, m.device, m.dtype, settings=m)
        names = {c.concept_id: c.name for c in self.dataset.concepts}
        writer = ProfileWriter()  # the user's facts; a text-only model describes no photo
        self._store_dir = tempfile.TemporaryDirectory(prefix="pkv-eval-qa-")
        # One store per storage quantization: a chunk id names the content, not its encoding.
        stores = {q: ChunkStore.open(url=f"file://{self._store_dir.name}/{q}") for q in ("none", "int8")}
        fingerprint = self.adapter.fingerprint()
        for c in self.dataset.concepts:
            profile = writer.write(c.name, c.category, _speak(c.info, names))
            evidence = profile_chunk_evidence(profile)
            self.evidence[c.concept_id] = evidence
            self.texts[c.concept_id] = evidence.content.decode()
            chunk = encode(self.adapter, evidence, user_id=EVAL_USER, concept_id=c.concept_id)
            for quantization, store in stores.items():
                store.put_chunk(EVAL_USER, c.concept_id, chunk.chunk_id, encode_chunk(chunk, quantization))
                self.chunks[c.concept_id, quantization] = decode_chunk(
                    store.get_chunk(EVAL_USER, c.concept_id, chunk.chunk_id), expected_model=fingerprint,
                    dtype=self.adapter.dtype, device=self.adapter.device,
                )
        letters = [self.adapter.tokenize(letter) for letter in OPTION_LETTERS]
        if any(len(ids) != 1 for ids in letters):
            raise ValueError("the tokenizer does not encode every option letter as one token")
        self.letter_ids = [ids[0] for ids in letters]
        self.option_ids = {item: [self.adapter.tokenize(option) for option in item.options] for item in self.items}
        if any(not ids for option_ids in self.option_ids.values() for ids in option_ids):
            raise ValueError("an option's text is empty: it cannot be scored by its likelihood")

    # evidence of one request
    def concepts_for(self, item: Item, cond: Condition, big: list[str] | None = None) -> list[str]:
        if cond.k == 0:
            return []
        if cond.k == 1:
            return [item.concept_id]
        if cond.k == self.k:
            return context_concepts(item, [c.concept_id for c in self.dataset.concepts], self.k, self.seed)
        return big or []

    def begin(self, question: str, cond: Condition, evidence_ids: list[str]):
        """The engine's first turn up to its first logits (``engine.answer`` without decoding)
        over the condition's evidence: (conversation, ``TurnStart``)."""
        from personalkv.kv.conversation import ConversationKV
        from personalkv.kv.engine import GenerationOptions

        options = GenerationOptions(max_new_tokens=0, recompute_ratio=cond.ratio,
                                    recompute_strategy=cond.strategy)
        conversation = ConversationKV()
        if cond.mode == "placed":
            chunks = [self.chunks[c, cond.quantization] for c in evidence_ids]
            started = conversation.begin_turn(self.adapter, chunks, question, options=options)
        else:  # the profiles' text in the user's message, then the question
            text = "".join(self.texts[c] for c in evidence_ids)
            started = conversation.begin_turn(self.adapter, [], text + question, options=options)
        return conversation, started

    def run(self, item: Item, order: tuple[int, ...], cond: Condition, evidence_ids: list[str]) -> Outcome:
        _, started = self.begin(mc_question(item, order), cond, evidence_ids)
        logits = started.logits.float().cpu()
        ttft = sum(started.timings[s] for s in ("place", "recompute", "prefill"))
        option_tokens = []
        if cond.scored:  # the option texts, from the state of the question that asks for a text
            conversation, asked = self.begin(mc_question(item, order, "text"), cond, evidence_ids)
            option_tokens = option_logprobs(self.adapter, conversation.ctx, asked.logits, self.option_ids[item])
        scores = torch.log_softmax(logits, -1)[self.letter_ids[: len(order)]]
        position = int(torch.argmax(scores))
        return Outcome(letter_logprobs=[float(s) for s in scores], option_token_logprobs=option_tokens,
                       pick=order[position], argmax=int(torch.argmax(logits)), ttft=ttft, logits=logits)

    def setup_big(self, target_tokens: int, pieces: int) -> list[str]:
        """``pieces`` chunks of about target_tokens / pieces tokens each, every one the
        concatenated profiles of consecutive concepts (the kv-core benchmark's evidence size;
        a dataset's single profiles are shorter). Stored and loaded like the others."""
        from personalkv.kv.codec import decode_chunk, encode_chunk
        from personalkv.kv.engine import encode
        from personalkv.kv.evidence import profile_evidence

        per_piece = max(1, target_tokens // pieces)
        ids = [c.concept_id for c in self.dataset.concepts]
        cursor, names = 0, []
        for i in range(pieces):
            text = ""
            while len(self.adapter.tokenize(text)) < per_piece:
                text += self.texts[ids[cursor % len(ids)]]
                cursor += 1
            name = f"evidence{i}"
            evidence = profile_evidence(text)
            self.texts[name] = evidence.content.decode()
            chunk = encode(self.adapter, evidence, user_id=EVAL_USER, concept_id=name)
            blob = encode_chunk(chunk, "none")
            self.chunks[name, "none"] = decode_chunk(blob, expected_model=self.adapter.fingerprint(),
                                                     dtype=self.adapter.dtype, device=self.adapter.device)
            names.append(name)
        return names

    def prompt_tokens_match(self, item: Item, evidence_ids: list[str]) -> bool:
        """Whether the prompt condition's tokens equal the placed chunks' tokens followed by the
        question's (so that placed and prompt differ only by how the KV was computed)."""
        question = self.adapter.question_parts(mc_question(item, orders(item)[0]))[-1]
        joined = self.adapter.tokenize("".join(self.texts[c] for c in evidence_ids) + question)
        parts = [t for c in evidence_ids for t in self.adapter.tokenize(self.texts[c])]
        return joined == parts + self.adapter.tokenize(question)


def evaluate(dataset_path, model: str, settings: Settings, *, ratios=DEFAULT_RATIOS, strategies=("deviation", "first", "query"),
             k: int = 3, max_concepts: int | None = None, max_questions: int | None = None,
             big_tokens: int = 2088, big_pieces: int = 10, big_questions: int = 4,
             threads: int | None = None, log=print) -> dict:
    """Run every condition on every item; returns the report (see ``summarize``). ``settings``:
    the process's settings (the shipped recompute defaults, the model's device and dtype)."""
    from personalkv.evaluation.dataset import load_dataset

    if threads:
        torch.set_num_threads(threads)
    default_ratio, default_strategy = settings.model.recompute_ratio, settings.model.recompute_strategy
    dataset = load_dataset(dataset_path)
    items = load_items(dataset, max_concepts, max_questions)
    if not items:
        raise ValueError(f"{dataset_path} has no text_mc questions")
    if max_concepts:
        keep = {i.concept_id for i in items}
        dataset = type(dataset)(dataset.root, tuple(c for c in dataset.concepts if c.concept_id in keep),
                                dataset.negatives, dataset.questions)
    if len(dataset.concepts) < k:
        raise ValueError(f"placed-{k} needs at least {k} concepts; the dataset has {len(dataset.concepts)}")
    harness = Harness(model, dataset, items, k=k, log=log)
    t0 = time.perf_counter()
    harness.setup(settings)
    # The questions the profile answers (the framed profile texts exist once set up).
    grounded = {i for i in items if len(i.options) == 2 and is_grounded(
        i.options[i.answer], i.options[1 - i.answer], harness.texts[i.concept_id])}
    big_k = big_pieces if big_tokens and big_pieces else 0
    big = harness.setup_big(big_tokens, big_pieces) if big_k else []
    big_evidence_tokens = sum(harness.chunks[b, "none"].meta.token_count for b in big)
    conds = build_conditions(k, ratios, strategies, default_ratio, default_strategy, big_k)
    log(f"[eval qa] {harness.adapter.name}: {len(items)} questions x 2 orders, {len(conds)} conditions, "
        f"setup {time.perf_counter() - t0:.0f}s")
    outcomes: dict[str, list[Outcome | None]] = {c.name: [] for c in conds}
    kl: dict[str, list[float]] = {c.name: [] for c in conds if c.counterpart}
    token_match = []
    pairs = [(item, order) for item in items for order in orders(item)]
    for n, (item, order) in enumerate(pairs):
        # The many-chunk conditions are timing only: a few questions, one order each.
        big_turn = n // 2 < big_questions and order == orders(item)[0]
        for cond in conds:
            if not cond.scored and not big_turn:
                outcomes[cond.name].append(None)
                continue
            evidence_ids = harness.concepts_for(item, cond, big)
            if cond.mode == "prompt" and order == orders(item)[0]:
                token_match.append(harness.prompt_tokens_match(item, evidence_ids))
            outcomes[cond.name].append(harness.run(item, order, cond, evidence_ids))
        for cond in conds:  # compare, then drop the logits
            out = outcomes[cond.name][-1]
            if out is not None and cond.counterpart:
                kl[cond.name].append(kl_divergence(outcomes[cond.counterpart][-1].logits, out.logits))
        for cond in conds:
            if outcomes[cond.name][-1] is not None:
                outcomes[cond.name][-1].logits = None
        if (n + 1) % 20 == 0 or n + 1 == len(pairs):
            log(f"[eval qa] {n + 1}/{len(pairs)} answered, {time.perf_counter() - t0:.0f}s")
    report = summarize(items, pairs, conds, outcomes, kl, default_ratio, default_strategy, k, big_k, grounded)
    report.update(
        dataset=str(dataset_path), model=model, model_fingerprint=harness.adapter.fingerprint(),
        threads=torch.get_num_threads(), dtype=settings.model.dtype,
        profile_tokens_mean=statistics.mean(
            harness.chunks[c.concept_id, "none"].meta.token_count for c in dataset.concepts),
        big_evidence_tokens=big_evidence_tokens, big_questions=min(big_questions, len(items)),
        prompt_tokens_match=f"{sum(token_match)}/{len(token_match)}",
        seconds=round(time.perf_counter() - t0, 1),
        example_profile=harness.texts[items[0].concept_id],
        example_question=mc_question(items[0], orders(items[0])[0]),
        example_text_question=mc_question(items[0], orders(items[0])[0], "text"),
    )
    return report


def summarize(items, pairs, conds, outcomes, kl, default_ratio, default_strategy, k, big_k,
              grounded: set[Item] = frozenset()) -> dict:
    """The report. ``grounded``: the items ``is_grounded`` marks, whose accuracy is also
    reported apart (``accuracy_likelihood_grounded`` / ``_other``)."""
    per_condition = {}
    correct = {}
    for cond in conds:
        outs = outcomes[cond.name]
        done = [(p, o) for p, o in zip(pairs, outs) if o is not None]
        row = {"mode": cond.mode, "k": cond.k, "quantization": cond.quantization,
               "recompute_ratio": cond.ratio if cond.mode == "placed" else None,
               "recompute_strategy": cond.strategy if cond.mode == "placed" else None,
               "answers": len(done),
               "ttft_ms_median": round(1000 * statistics.median(o.ttft for _, o in done), 2)}
        if cond.scored:
            likelihood = _per_question(pairs, outs, _likelihood_scores)
            correct[cond.name] = likelihood
            per_pair = [_best(_likelihood_scores(order, o)) == item.answer for (item, order), o in done]
            by_sum = _per_question(pairs, outs, lambda order, o: [sum(t) for t in o.option_token_logprobs])
            letter = [o.pick == item.answer for (item, _), o in done]
            # Accuracy on the questions the profile answers (``is_grounded``) and on the rest
            # (what only the photos show: no text evidence can lift those).
            grounded_ids = {id(item) for item in grounded}
            asked = list(dict.fromkeys(id(item) for (item, _), o in done))
            for label, keep in (("grounded", True), ("other", False)):
                subset = [hit for q, hit in zip(asked, likelihood) if (q in grounded_ids) == keep]
                if subset:
                    row.update(_accuracy(f"accuracy_likelihood_{label}", subset))
                row[f"questions_{label}"] = len(subset)
            row.update(_accuracy("accuracy_likelihood", likelihood), **_accuracy("accuracy_likelihood_pairs", per_pair),
                       **_accuracy("accuracy_likelihood_sum", by_sum), **_accuracy("accuracy_letter", letter),
                       **_accuracy("accuracy_letter_calibrated", _per_question(pairs, outs, _letter_scores)),
                       picks_first_letter=sum(o.letter_logprobs[0] >= max(o.letter_logprobs)
                                              for _, o in done) / len(done))
        if cond.counterpart:
            ref = [o for o in outcomes[cond.counterpart]]
            both = [(r, o) for r, o in zip(ref, outs) if o is not None and r is not None]
            values = kl[cond.name]
            row.update(counterpart=cond.counterpart,
                       kl_mean=statistics.mean(values), kl_median=statistics.median(values),
                       kl_max=max(values),
                       identical_answers=sum(r.pick == o.pick for r, o in both) / len(both),
                       identical_argmax=sum(r.argmax == o.argmax for r, o in both) / len(both),
                       ttft_ratio_counterpart_over_this=round(
                           per_condition[cond.counterpart]["ttft_ms_median"] / row["ttft_ms_median"], 2))
        per_condition[cond.name] = row
    tests = {}
    for cond in conds:
        if not cond.scored:
            continue
        other = cond.counterpart or ("none" if cond.mode == "prompt" else None)
        if other and other in correct:
            tests[f"{cond.name} vs {other}"] = mcnemar_exact(correct[cond.name], correct[other])
    out = {
        "conditions": per_condition,
        "mcnemar": tests,
        "sweep": sweep_rows(per_condition),
        "questions": len(items), "answers_per_condition": len(pairs), "k": k,
    }
    out.update(headline(per_condition, k, big_k, default_ratio, default_strategy))
    return out


def headline(per_condition: dict, k: int, big_k: int, ratio: float, strategy: str) -> dict:
    """The figures the issue asks for, at recompute share ``ratio`` with ``strategy``."""
    default3 = placed_name(k, ratio, strategy)
    out = {
        "default_recompute_ratio": ratio, "default_recompute_strategy": strategy,
        "placed_vs_prompt_identical": per_condition["placed1"]["identical_answers"],
        "placed_vs_prompt_identical_argmax": per_condition["placed1"]["identical_argmax"],
        "placed_vs_prompt_max_kl": per_condition["placed1"]["kl_max"],
        "placed_int8_vs_prompt_identical": per_condition["placed1_int8"]["identical_answers"],
        "placed3_kl_mean": per_condition[default3]["kl_mean"],
        "placed3_identical": per_condition[default3]["identical_answers"],
        "placed3_identical_argmax": per_condition[default3]["identical_argmax"],
        "ttft_ratio_prompt3_over_placed3": per_condition[default3]["ttft_ratio_counterpart_over_this"],
    }
    # Does the evidence make the answer right: option text likelihood (per question, both orders);
    # beside it the letter's, calibrated over both orders (which cancels the letter prior).
    for key, name in (("none", "none"), ("prompt1", "prompt1"), ("placed1", "placed1"),
                      (f"prompt{k}", f"prompt{k}"), (f"placed{k}", default3)):
        for prefix, column in (("accuracy", "accuracy_likelihood"), ("accuracy_letter", "accuracy_letter_calibrated")):
            out[f"{prefix}_{key}"] = per_condition[name][column]
            out[f"{prefix}_{key}_ci95"] = per_condition[name][f"{column}_ci95"]
    if big_k:
        big_default = placed_name(big_k, ratio, strategy)
        out[f"ttft_ratio_prompt{big_k}_over_placed{big_k}"] = \
            per_condition[big_default]["ttft_ratio_counterpart_over_this"]
    return out


def _accuracy(key: str, hits: list[bool]) -> dict:
    low, high = wilson(sum(hits), len(hits))
    return {key: sum(hits) / len(hits), f"{key}_ci95": [low, high]}


def _best(scores: list[float]) -> int:
    return max(range(len(scores)), key=scores.__getitem__)


def _likelihood_scores(order, out: Outcome) -> list[float]:
    """Per option (dataset order): its text's likelihood score."""
    return [option_score(tokens) for tokens in out.option_token_logprobs]


def _letter_scores(order, out: Outcome) -> list[float]:
    """Per option (dataset order): the log-probability of the letter it was presented under."""
    scores = [0.0] * len(order)
    for position, option in enumerate(order):
        scores[option] = out.letter_logprobs[position]
    return scores


def _per_question(pairs, outs, scores_of) -> list[bool]:
    """Per question: whether the option with the highest score summed over its orders is right."""
    by_item: dict[int, list] = {}
    for (item, order), out in zip(pairs, outs):
        if out is None:
            continue
        total = by_item.setdefault(id(item), [item, [0.0] * len(item.options)])[1]
        for option, score in enumerate(scores_of(order, out)):
            total[option] += score
    return [_best(total) == item.answer for item, total in by_item.values()]


# --- output -------------------------------------------------------------------------------
def sweep_rows(conditions: dict) -> list[dict]:
    """The recompute sweep: every multi-chunk placed condition (full precision) as one row
    (chunks, strategy, r, KL mean / max vs the same evidence in the prompt, identical answers,
    TTFT ratio prompt / placed), ordered by chunks, strategy, r."""
    rows = []
    for name, row in conditions.items():
        if row["mode"] == "placed" and row["k"] > 1 and row["quantization"] == "none":
            rows.append({"condition": name, "chunks": row["k"], "strategy": row["recompute_strategy"],
                         "ratio": row["recompute_ratio"], "kl_mean": row["kl_mean"], "kl_max": row["kl_max"],
                         "identical_answers": row["identical_answers"], "answers": row["answers"],
                         "ttft_ratio_prompt_over_placed": row["ttft_ratio_counterpart_over_this"]})
    return sorted(rows, key=lambda r: (r["chunks"], r["strategy"], r["ratio"]))


def format_table(report: dict) -> str:
    lines = [f"{'condition':34s} {'acc':>6s} {'95% CI':>13s} {'letter':>6s} {'calib':>6s} {'KL mean':>9s} "
             f"{'KL max':>9s} {'same ans':>8s} {'same argmax':>11s} {'TTFT ms':>8s}",
             "(acc: option text likelihood per question; letter: raw per answer; calib: letter over both orders)"]
    for name, row in report["conditions"].items():
        scored = "accuracy_likelihood" in row
        acc = f"{row['accuracy_likelihood']:.3f}" if scored else "-"
        ci = "[{:.2f}, {:.2f}]".format(*row["accuracy_likelihood_ci95"]) if scored else "-"
        letter = f"{row['accuracy_letter']:.3f}" if scored else "-"
        cal = f"{row['accuracy_letter_calibrated']:.3f}" if scored else "-"
        kl_mean = f"{row['kl_mean']:.2e}" if "kl_mean" in row else "-"
        kl_max = f"{row['kl_max']:.2e}" if "kl_max" in row else "-"
        same = f"{row['identical_answers']:.3f}" if "identical_answers" in row else "-"
        same_max = f"{row['identical_argmax']:.3f}" if "identical_argmax" in row else "-"
        lines.append(f"{name:34s} {acc:>6s} {ci:>13s} {letter:>6s} {cal:>6s} {kl_mean:>9s} {kl_max:>9s} "
                     f"{same:>8s} {same_max:>11s} {row['ttft_ms_median']:>8.1f}")
    lines.append("")
    for name, test in report["mcnemar"].items():
        lines.append(f"McNemar {name}: {test['only_first_correct']} vs {test['only_second_correct']} "
                     f"discordant, p={test['p']:.3g}")
    return "\n".join(lines)


def write_png(report: dict, path: Path) -> Path:
    """Accuracy per scored condition (option text likelihood and calibrated letter, with 95%
    intervals); KL and TTFT over the recompute share r per strategy, for k and for the many-chunk
    condition (solid / dashed). Drawn with matplotlib (Agg, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = report["conditions"]
    colours = {"deviation": "tab:red", "first": "tab:blue", "query": "tab:purple",
               "option text likelihood": "tab:green", "letter, calibrated": "0.35"}
    fig = Figure(figsize=(17, 6.5), layout="constrained")
    FigureCanvasAgg(fig)
    acc, kl, ttft = fig.subplots(1, 3, width_ratios=(1.3, 1, 1))
    fig.suptitle(f"Profile QA: {report.get('model', '?')} on {Path(str(report.get('dataset', '?'))).name}, "
                 f"{report.get('questions', '?')} questions, placed KV chunks vs profile in the prompt")

    # 1: accuracy bars
    scored = [(n, r) for n, r in rows.items() if "accuracy_likelihood" in r]
    height = 0.4
    for j, (key, label) in enumerate((("accuracy_likelihood", "option text likelihood"),
                                      ("accuracy_letter_calibrated", "letter, calibrated"))):
        values = [r[key] for _, r in scored]
        errors = [[v - r[f"{key}_ci95"][0] for v, (_, r) in zip(values, scored)],
                  [r[f"{key}_ci95"][1] - v for v, (_, r) in zip(values, scored)]]
        acc.barh([i + (j - 0.5) * height for i in range(len(scored))], values, height, xerr=errors,
                 color=colours[label], label=label, error_kw={"elinewidth": 1, "capsize": 2})
    acc.axvline(0.5, color="0.6", linestyle=":", label="0.5")
    acc.set_yticks(range(len(scored)), [n for n, _ in scored])
    acc.invert_yaxis()
    acc.set_xlim(0, 1)
    acc.set_xlabel("accuracy (error bars: 95% Wilson intervals)")
    acc.set_ylabel("condition")
    acc.set_title("Accuracy per condition")
    acc.legend(loc="best")

    # 2 and 3: curves over r for the placed-k and placed-big conditions
    curves: dict[tuple[int, str], list[tuple[float, dict]]] = {}
    for point in sweep_rows(rows):
        for strategy in ("deviation", "first", "query"):
            if point["ratio"] in (0.0, 1.0) or point["strategy"] == strategy:
                curves.setdefault((point["chunks"], strategy), []).append(
                    (point["ratio"], rows[point["condition"]]))
    ks = sorted({kk for kk, _ in curves})

    def curve_panel(ax, key, title, ylabel, ks, floor=0.0):
        """Log scale; points below ``floor`` (KL of full recompute, ~1e-11) are drawn at it."""
        for (kk, strategy), pts in sorted(curves.items()):
            if kk not in ks:
                continue
            pts = sorted((ratio, max(r[key], floor)) for ratio, r in pts if key in r)
            if pts:
                first = kk == ks[0]
                ax.plot(*zip(*pts), marker="o", color=colours[strategy], linewidth=2 if first else 1,
                        linestyle="-" if first else "--", label=f"placed{kk}, {strategy}")
        if key == "ttft_ms_median":
            for kk, style in zip(ks, ("-", "--", ":", "-.")):
                prompt = rows.get(f"prompt{kk}")
                if prompt:
                    ax.axhline(prompt["ttft_ms_median"], color="0.5", linestyle=style,
                               label=f"prompt{kk}: {prompt['ttft_ms_median']:.0f} ms")
        ax.set_xlabel("recompute share r")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if ax.has_data():
            ax.set_yscale("log")
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no placed-k conditions", ha="center", va="center", transform=ax.transAxes)

    curve_panel(kl, "kl_mean", "KL(prompt || placed) over r", "KL mean (log; below 1e-4 drawn at 1e-4)", ks,
                floor=1e-4)
    curve_panel(ttft, "ttft_ms_median", "TTFT over r", "TTFT median, ms (log)", ks)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
