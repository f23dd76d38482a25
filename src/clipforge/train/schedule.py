"""Learning-rate schedules as pure functions of the step (so resume needs no scheduler state)."""

from __future__ import annotations

import math

from clipforge.config import ScheduleConfig


def lr_at(step: int, total_steps: int, base_lr: float, cfg: ScheduleConfig) -> float:
    """Learning rate for optimiser step ``step`` (0-based) of ``total_steps``.

    Linear warmup from base_lr/warmup to base_lr over ``warmup_steps``; then constant, or a
    half-cosine down to ``min_lr_ratio * base_lr`` at the last step, or (cooldown) constant until the
    last ``cooldown_steps``, which decay as (1 - t)^power to that floor.
    """
    if step < cfg.warmup_steps:
        return base_lr * (step + 1) / cfg.warmup_steps
    if cfg.kind == "constant":
        return base_lr
    floor = cfg.min_lr_ratio * base_lr
    if cfg.kind == "cooldown":
        start = max(cfg.warmup_steps, total_steps - cfg.cooldown_steps)
        if step < start:
            return base_lr
        progress = min(1.0, (step - start) / max(1, total_steps - start))
        return floor + (base_lr - floor) * (1.0 - progress) ** cfg.cooldown_power
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
