"""The serving metrics (observability.SERVING) read back from the Prometheus registry after
feeding them real AskResults of the embedded services (tiny Qwen2-VL)."""

from __future__ import annotations

from dataclasses import fields

import pytest
from prometheus_client import REGISTRY

from personalkv.observability import SERVING
from personalkv.service_layer import answering, concepts
from personalkv.service_layer.answering import AskOptions, Timings

BLUE = (30, 60, 200)
EXACT = 1e-9  # sums of float seconds: the registry adds the same floats we add here


def _value(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _snapshot() -> dict[str, float]:
    names = ["personalkv_answer_time_to_first_token_seconds_count",
             "personalkv_answer_time_to_first_token_seconds_sum",
             "personalkv_answer_time_per_output_token_seconds_count",
             "personalkv_answer_time_per_output_token_seconds_sum",
             "personalkv_answer_generated_tokens_total",
             "personalkv_answer_prompt_tokens_reused_total"]
    values = {name: _value(name) for name in names}
    for f in fields(Timings):
        for suffix in ("count", "sum"):
            values[f"stage:{f.name}:{suffix}"] = _value(
                f"personalkv_answer_stage_seconds_{suffix}", stage=f.name)
    return values


def _delta(before: dict[str, float]) -> dict[str, float]:
    after = _snapshot()
    return {k: after[k] - before[k] for k in before}


@pytest.fixture
def ready_user(svc, photo_of):
    concepts.create_concept(svc, "alice", "mug", "Bobo", "mug", "my Bobo mug with a white square")
    concepts.add_photos(svc, "alice", "mug", [photo_of(BLUE, 0)])
    return svc


def test_an_answered_ask_feeds_ttft_tpot_stages_and_token_counters(ready_user):
    result = answering.ask(ready_user, "alice", "What is Bobo?", [],
                           AskOptions(max_new_tokens=6, temperature=0.0))
    generated = len(result.token_ids)
    assert generated > 1 and result.reused_tokens > 0  # else TPOT / reuse would not be tested
    before = _snapshot()
    SERVING.answered(result)
    d = _delta(before)

    t = result.timings
    ttft = t.queue + t.retrieve + t.load + t.place + t.recompute + t.prefill + t.rebuild
    assert d["personalkv_answer_time_to_first_token_seconds_count"] == 1
    assert d["personalkv_answer_time_to_first_token_seconds_sum"] == pytest.approx(ttft, abs=EXACT)
    assert d["personalkv_answer_time_per_output_token_seconds_count"] == 1
    assert d["personalkv_answer_time_per_output_token_seconds_sum"] == pytest.approx(
        t.decode / (generated - 1), abs=EXACT)
    assert d["personalkv_answer_generated_tokens_total"] == generated
    assert d["personalkv_answer_prompt_tokens_reused_total"] == result.reused_tokens
    for f in fields(Timings):  # one observation per stage, of that stage's seconds
        assert d[f"stage:{f.name}:count"] == 1, f.name
        assert d[f"stage:{f.name}:sum"] == pytest.approx(getattr(t, f.name), abs=EXACT), f.name


def test_a_one_token_answer_has_a_ttft_but_no_tpot(ready_user):
    result = answering.ask(ready_user, "alice", "What is Bobo?", [],
                           AskOptions(max_new_tokens=1, temperature=0.0))
    assert len(result.token_ids) <= 1
    before = _snapshot()
    SERVING.answered(result)
    d = _delta(before)
    assert d["personalkv_answer_time_to_first_token_seconds_count"] == 1
    assert d["personalkv_answer_time_per_output_token_seconds_count"] == 0
    assert d["personalkv_answer_generated_tokens_total"] == len(result.token_ids)


def test_scheduler_reports_queue_batches_and_refusals():
    SERVING.queue_depth(3)
    SERVING.running(5)
    assert _value("personalkv_answer_requests_queued") == 3
    assert _value("personalkv_answer_requests_in_flight") == 5
    SERVING.queue_depth(0)
    assert _value("personalkv_answer_requests_queued") == 0

    batches = _value("personalkv_answer_batch_size_count")
    size_sum = _value("personalkv_answer_batch_size_sum")
    at_most_4 = _value("personalkv_answer_batch_size_bucket", le="4.0")
    SERVING.batch(3)
    SERVING.batch(8)
    assert _value("personalkv_answer_batch_size_count") == batches + 2
    assert _value("personalkv_answer_batch_size_sum") == size_sum + 11
    assert _value("personalkv_answer_batch_size_bucket", le="4.0") == at_most_4 + 1

    waits = _value("personalkv_answer_queue_wait_seconds_count")
    SERVING.queue_wait(0.25)
    assert _value("personalkv_answer_queue_wait_seconds_count") == waits + 1

    # both reasons are exported from the start (0 until the first refusal)
    assert REGISTRY.get_sample_value("personalkv_answer_rejected_total", {"reason": "deadline"}) is not None
    full = _value("personalkv_answer_rejected_total", reason="queue_full")
    SERVING.rejected("queue_full")
    assert _value("personalkv_answer_rejected_total", reason="queue_full") == full + 1
    with pytest.raises(ValueError, match="not one of"):
        SERVING.rejected("alice")  # label values stay a closed set
