"""Learning-rate groups and schedules (models/optim.py)."""
from __future__ import annotations

import math

import pytest
import torch

from models import LR_SCHEDULES, lr_factor, scale_learning_rates


def test_constant_schedule_is_the_reference():
    assert all(lr_factor("constant", step, 10) == 1.0 for step in range(12))


def test_cosine_schedule_falls_from_one_to_zero():
    factors = [lr_factor("cosine", step, 8) for step in range(9)]
    assert factors[0] == 1.0 and factors[4] == pytest.approx(0.5) and factors[8] == pytest.approx(0.0)
    assert all(a > b for a, b in zip(factors, factors[1:]))
    assert factors[2] == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    assert lr_factor("cosine", 20, 8) == pytest.approx(0.0)  # past the end: stays at the floor
    assert lr_factor("cosine", 3, 0) == 1.0  # nothing to schedule


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'step'"):
        lr_factor("step", 0, 10)
    assert LR_SCHEDULES == ("constant", "cosine")


def test_scale_learning_rates_keeps_the_initial_rates():
    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([{"params": [w], "lr": 1e-3}, {"params": [], "lr": 0.0}])
    scale_learning_rates(opt, 0.25)
    scale_learning_rates(opt, 0.5)  # relative to the initial rate, not the current one
    assert [g["lr"] for g in opt.param_groups] == [5e-4, 0.0]
    assert [g["initial_lr"] for g in opt.param_groups] == [1e-3, 0.0]


def test_the_trial_script_offers_every_schedule():
    import option

    action = next(a for a in option.build_parser()._actions if a.dest == "lr_schedule")
    assert tuple(action.choices) == LR_SCHEDULES
