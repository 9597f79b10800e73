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
