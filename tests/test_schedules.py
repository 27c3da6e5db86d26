import math

import pytest

from sslkit.schedules import OptimSchedule, cosine, linear, linear_warmup_cosine


def test_warmup_is_linear_and_hits_peak():
    assert linear_warmup_cosine(0, 100, 1.0, 0.0, 10) == 0.0
    assert linear_warmup_cosine(5, 100, 1.0, 0.0, 10) == pytest.approx(0.5)
    assert linear_warmup_cosine(10, 100, 1.0, 0.0, 10) == pytest.approx(1.0)


def test_cosine_midpoint_and_end():
    # after warm-up, halfway through the decay the cosine is at the mean of peak and final
    assert linear_warmup_cosine(55, 100, 1.0, 0.2, 10) == pytest.approx(0.6)
    assert linear_warmup_cosine(100, 100, 1.0, 0.2, 10) == pytest.approx(0.2)
    assert linear_warmup_cosine(1000, 100, 1.0, 0.2, 10) == pytest.approx(0.2)
    # a hand-computed point: step 32 of a 0-warm-up cosine over 128 steps = 0.5 * (1 + cos(pi/4))
    assert cosine(32, 128, 1.0, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_monotone_after_warmup():
    vals = [linear_warmup_cosine(s, 50, 3.0, 0.1, 5) for s in range(5, 51)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_linear_ramp():
    assert linear(0, 10, 1.0, 0.9) == 1.0
    assert linear(5, 10, 1.0, 0.9) == pytest.approx(0.95)
    assert linear(20, 10, 1.0, 0.9) == pytest.approx(0.9)


def test_optim_schedule_pure():
    s = OptimSchedule(total_steps=100, lr=1e-3, min_lr=1e-5, warmup_steps=10, weight_decay=0.04, weight_decay_end=0.4)
    assert s.lr_at(37) == s.lr_at(37)
    assert s.wd_at(0) == pytest.approx(0.04) and s.wd_at(100) == pytest.approx(0.4)
    assert OptimSchedule(100, 1e-3, 0.0, 0, 0.05).wd_at(77) == 0.05


def test_negative_step_rejected():
    with pytest.raises(ValueError):
        linear_warmup_cosine(-1, 10, 1.0)
