import math

import pytest

from clipforge.config import ScheduleConfig
from clipforge.train.schedule import lr_at


def test_warmup_is_linear_then_cosine_reaches_floor():
    cfg = ScheduleConfig(kind="cosine", warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, 110, 1.0, cfg) for s in range(110)]
    assert lrs[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(110, 110, 1.0, cfg) == pytest.approx(0.1)


def test_constant_after_warmup_and_purity():
    cfg = ScheduleConfig(kind="constant", warmup_steps=4)
    assert [lr_at(s, 100, 2.0, cfg) for s in (0, 3, 4, 99)] == [0.5, 2.0, 2.0, 2.0]
    assert lr_at(57, 100, 2.0, cfg) == lr_at(57, 100, 2.0, cfg)
