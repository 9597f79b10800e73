"""Batched decode on a CUDA device: the same equality as ``test_batch_cpu`` (greedy answers in
a padded batch equal the solo loop's, rows joining and leaving), with the cache, the mask and
the positions on the device. Skipped where no CUDA device is present."""

from __future__ import annotations

import pytest
import torch

from personalkv.config import ModelSettings
from personalkv.models import load_adapter
from personalkv.models.tiny import KINDS
from tests.unit.engine.test_batch_cpu import _check

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("kind", KINDS)
def test_batched_greedy_answers_equal_solo_answers_on_cuda(kind):
    adapter = load_adapter(f"tiny:{kind}", device="cuda", settings=ModelSettings())
    _check(adapter, join_at=[0, 2, 3, 5])
