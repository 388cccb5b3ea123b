"""The reference's optimiser layout: one Adam parameter group per top-level module."""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

LR_SCHEDULES = ("constant", "cosine")
# Group order as in the reference; each has an ``init_lr_<name>`` option.
PARAM_GROUPS = ("res365_last", "mobileNet", "head", "head_rgb", "hypernet", "tygertnet")


def parameter_groups(model: nn.Module, lrs: Mapping[str, float]) -> list[dict]:
    """``[{'params': ..., 'lr': lrs[name], 'name': name}, ...]`` for the six modules (those the
    model has, when it leaves branches out).

    The theme ResNet keeps its group (and learning rate) although its parameters are
    frozen, as in the reference: Adam skips parameters that get no gradient.
    """
    missing = [name for name in PARAM_GROUPS if name not in lrs]
    if missing:
        raise ValueError(f"no learning rate for parameter groups {missing}")
    return [
        {"params": list(getattr(model, name).parameters()), "lr": float(lrs[name]), "name": name}
        for name in PARAM_GROUPS if hasattr(model, name)  # the modules of the branches the model has
    ]


def lr_factor(schedule: str, step: int, total_steps: int) -> float:
    """Multiplier of every group's initial learning rate at training step ``step`` (0-based) of
    ``total_steps``: ``constant`` (the reference) is 1; ``cosine`` falls from 1 towards 0."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; expected one of {LR_SCHEDULES}")
    if schedule == "constant" or total_steps <= 0:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(max(step, 0), total_steps) / total_steps))


def scale_learning_rates(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Set every group's learning rate to ``factor`` times its initial one (kept as ``initial_lr``,
    which the optimiser's state_dict saves)."""
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
        group["lr"] = group["initial_lr"] * factor
