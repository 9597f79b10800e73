"""The scheduler's admission policy alone (``engine.policy``): numbers in, a count out; no
model is loaded."""

from __future__ import annotations

from personalkv.engine.batch import HEADROOM
from personalkv.engine.memory import admission_peak_bytes
from personalkv.engine.policy import AdmissionLimits, admissible

PER_TOKEN = 1000
ROOMY = AdmissionLimits(max_batch=4, max_tokens_in_flight=10_000, kv_bytes_per_token=PER_TOKEN,
                        kv_budget_bytes=10**12)


def test_rows_limit_oldest_first():
    assert admissible([], [100, 100, 100, 100, 100], ROOMY) == 4
    assert admissible([100, 100, 100], [100, 100], ROOMY) == 1
    assert admissible([100] * 4, [1], ROOMY) == 0


def test_the_token_limit_stops_at_the_first_that_does_not_fit():
    limits = AdmissionLimits(4, 1000, PER_TOKEN, 10**12)
    assert admissible([400], [300, 400, 100], limits) == 1  # the 400 waits; the 100 behind it too
    assert admissible([], [1500], limits) == 1  # alone in an empty batch: it runs


def test_the_byte_budget_counts_the_relayout_peak():
    need = 200
    alone = admission_peak_bytes([], need, PER_TOKEN)
    limits = AdmissionLimits(8, 10**9, PER_TOKEN, kv_budget_bytes=alone)
    assert admissible([], [need, need], limits) == 1  # two would pass the peak
    assert not limits.never_fits(need) and limits.never_fits(need + 1)
    assert alone == (need + HEADROOM + need) * PER_TOKEN


def test_waiting_needs_are_read_only_as_far_as_needed():
    read = []

    def needs():
        for n in (100, 100, 100, 100, 100, 100):
            read.append(n)
            yield n

    assert admissible([100, 100], needs(), ROOMY) == 2
    assert len(read) <= 3  # the third is read to see it does not fit; the rest never


# --- plan_step: one step's plan from numbers -------------------------------------------------
from personalkv.engine.policy import TO_THE_END, EndReason, Phase, RequestView, StepPlan, plan_step  # noqa: E402


def _view(key, phase, need=100, end=None):
    return RequestView(key=key, phase=phase, need=need, end=end)


def test_with_nothing_decoding_the_oldest_prefill_runs_to_its_end():
    plan = plan_step([_view(1, Phase.WAITING), _view(2, Phase.WAITING)], ROOMY)
    assert plan == StepPlan(admit=(1, 2), prefill=((1, TO_THE_END), (2, 1)))


def test_while_rows_decode_the_oldest_joining_requests_advance_one_piece_each():
    requests = [_view(1, Phase.DECODING), _view(5, Phase.DECODING), _view(2, Phase.PREFILLING),
                _view(3, Phase.WAITING), _view(4, Phase.WAITING)]
    roomier = AdmissionLimits(8, 10_000, PER_TOKEN, 10**12)
    assert plan_step(requests, roomier, prefill_pieces=1) == StepPlan(admit=(3, 4), prefill=((2, 1),), decode=(1, 5))
    assert plan_step(requests, roomier, prefill_pieces=2).prefill == ((2, 1), (3, 1))
    assert plan_step(requests, roomier).prefill == ((2, 1), (3, 1), (4, 1))  # 0: every one


def test_a_burst_of_joining_requests_advances_as_many_more_as_they_outnumber_the_decoding():
    burst = [_view(1, Phase.DECODING), *(_view(k, Phase.PREFILLING) for k in range(2, 8))]
    assert len(plan_step(burst, ROOMY, prefill_pieces=1).prefill) == 5  # 6 joining - 1 decoding
    steady = [*(_view(k, Phase.DECODING) for k in range(1, 7)), _view(7, Phase.PREFILLING),
              _view(8, Phase.PREFILLING)]
    assert plan_step(steady, ROOMY, prefill_pieces=1).prefill == ((7, 1),)


def test_requests_nobody_waits_for_end_first_and_take_no_room():
    limits = AdmissionLimits(max_batch=2, max_tokens_in_flight=10_000, kv_bytes_per_token=PER_TOKEN,
                             kv_budget_bytes=10**12)
    plan = plan_step([_view(1, Phase.DECODING, end=EndReason.CANCELLED), _view(2, Phase.DECODING),
                      _view(3, Phase.WAITING, end=EndReason.EXPIRED), _view(4, Phase.WAITING),
                      _view(5, Phase.WAITING)], limits)
    assert plan.end == ((1, EndReason.CANCELLED), (3, EndReason.EXPIRED))
    assert plan.admit == (4,)  # the cancelled row's place is free; one row left for 4 and 5
    assert plan.decode == (2,) and plan.prefill == ((4, 1),)


def test_a_full_batch_admits_nobody_and_an_idle_engine_plans_nothing():
    full = [_view(k, Phase.DECODING) for k in range(4)]
    assert plan_step([*full, _view(9, Phase.WAITING)], ROOMY).admit == ()
    assert not plan_step([], ROOMY)
