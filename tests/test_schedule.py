import math

import pytest

from clipforge.config import RecipeError, load_recipe

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


def test_cooldown_is_warmup_then_constant_then_a_power_decay_to_the_floor():
    cfg = ScheduleConfig(kind="cooldown", warmup_steps=10, cooldown_steps=20, cooldown_power=2.0, min_lr_ratio=0.1)
    lrs = [lr_at(s, 100, 1.0, cfg) for s in range(101)]
    assert lrs[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert lrs[10:80] == [1.0] * 70  # stable until the last 20 steps
    assert lrs[85] == pytest.approx(0.1 + 0.9 * (1 - 5 / 20) ** 2)
    assert all(a > b for a, b in zip(lrs[80:], lrs[81:]))
    assert lrs[100] == pytest.approx(0.1)


def test_a_cooldown_run_extended_while_constant_follows_the_same_schedule():
    # resuming with a larger train.steps before the decay starts changes nothing already done
    cfg = ScheduleConfig(kind="cooldown", warmup_steps=5, cooldown_steps=10)
    short = [lr_at(s, 50, 1.0, cfg) for s in range(40)]
    longer = [lr_at(s, 80, 1.0, cfg) for s in range(80)]
    assert longer[:40] == short
    assert longer[70:] == [lr_at(s, 50, 1.0, cfg) for s in range(40, 50)]  # the same decay, later


def test_cooldown_settings_that_cannot_work_are_refused():
    with pytest.raises(RecipeError, match="set it"):
        load_recipe("tiny-shapes", ["schedule.kind=cooldown"])
    with pytest.raises(RecipeError, match="only applies to kind = 'cooldown'"):
        load_recipe("tiny-shapes", ["schedule.cooldown_steps=10"])
    with pytest.raises(RecipeError, match="exceed train.steps"):
        load_recipe("tiny-shapes", ["schedule.kind=cooldown", "schedule.cooldown_steps=960", "train.steps=1000"])
