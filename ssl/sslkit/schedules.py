"""Schedules: pure functions of the optimizer step. No state, no side effects, unit-tested.

The loop evaluates them at the start of every step and writes the values into the optimizer's param
groups (and hands method-specific values to the method's per-step hook), so resuming at step ``s``
gives the same values as an uninterrupted run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def linear_warmup_cosine(step: int, total_steps: int, peak: float, final: float = 0.0, warmup_steps: int = 0,
                         start: float = 0.0) -> float:
    """Linear warm-up from ``start`` to ``peak`` over ``warmup_steps``, then half-cosine to ``final``.

    Step ``warmup_steps`` returns ``peak`` exactly; step ``total_steps`` (and beyond) returns ``final``.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps > 0 and step < warmup_steps:
        return start + (peak - start) * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / decay_steps)
    return final + 0.5 * (peak - final) * (1.0 + math.cos(math.pi * t))


def cosine(step: int, total_steps: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` (step 0) to ``end`` (step ``total_steps`` and beyond)."""
    return linear_warmup_cosine(step, total_steps, peak=start, final=end, warmup_steps=0)


def linear(step: int, total_steps: int, start: float, end: float) -> float:
    """Linear ramp from ``start`` (step 0) to ``end`` (step ``total_steps`` and beyond)."""
    t = min(1.0, max(0.0, step / max(1, total_steps)))
    return start + (end - start) * t


@dataclass(frozen=True)
class OptimSchedule:
    """lr and weight decay of the optimizer as functions of the step."""

    total_steps: int
    lr: float
    min_lr: float
    warmup_steps: int
    weight_decay: float
    weight_decay_end: float | None = None

    def lr_at(self, step: int) -> float:
        return linear_warmup_cosine(step, self.total_steps, self.lr, self.min_lr, self.warmup_steps)

    def wd_at(self, step: int) -> float:
        if self.weight_decay_end is None:
            return self.weight_decay
        return cosine(step, self.total_steps, self.weight_decay, self.weight_decay_end)
