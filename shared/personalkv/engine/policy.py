"""The scheduler's admission policy, as plain functions over numbers: which waiting requests
join the batch now. No model, no tensors: ``tests/unit/engine/test_policy.py`` tests it alone.

A request is counted by the KV tokens its row holds when its answer is complete (its "need":
history or system prefix, evidence, question, ``max_new_tokens``). Requests join oldest first
while the batch has a free row, the tokens in flight stay within ``max_tokens_in_flight`` and
the bytes at the re-layout's peak within the KV budget (``engine.memory``). A request alone
in an empty batch always joins unless it can never fit (refused before it queues).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from personalkv.engine.memory import admission_peak_bytes


@dataclass(frozen=True)
class AdmissionLimits:
    max_batch: int
    max_tokens_in_flight: int
    kv_bytes_per_token: int
    kv_budget_bytes: int

    def fits(self, in_flight: Sequence[int], need: int) -> bool:
        """Whether a request needing ``need`` tokens fits beside ``in_flight`` (their needs)."""
        return (sum(in_flight) + need <= self.max_tokens_in_flight
                and admission_peak_bytes(in_flight, need, self.kv_bytes_per_token) <= self.kv_budget_bytes)

    def never_fits(self, need: int) -> bool:
        """Whether a request needing ``need`` tokens could not run even alone."""
        return not self.fits([], need)


def admissible(in_flight: Sequence[int], waiting: Iterable[int], limits: AdmissionLimits) -> int:
    """How many of ``waiting`` (their needs, oldest first; read lazily, only as far as
    needed) join a batch whose rows (decoding or being prefilled) need ``in_flight``."""
    rows, joined = list(in_flight), 0
    for need in waiting:
        if len(rows) >= limits.max_batch or (rows and not limits.fits(rows, need)):
            break
        rows.append(need)
        joined += 1
    return joined
