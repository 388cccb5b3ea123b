"""The reference's optimiser layout: one Adam parameter group per top-level module."""
from __future__ import annotations

from collections.abc import Mapping

from torch import nn

# Group order as in the reference; each has an ``init_lr_<name>`` option.
PARAM_GROUPS = ("res365_last", "mobileNet", "head", "head_rgb", "hypernet", "tygertnet")


def parameter_groups(model: nn.Module, lrs: Mapping[str, float]) -> list[dict]:
    """``[{'params': ..., 'lr': lrs[name], 'name': name}, ...]`` for the six modules.

    The theme ResNet keeps its group (and learning rate) although its parameters are
    frozen, as in the reference: Adam skips parameters that get no gradient.
    """
    missing = [name for name in PARAM_GROUPS if name not in lrs]
    if missing:
        raise ValueError(f"no learning rate for parameter groups {missing}")
    return [
        {"params": list(getattr(model, name).parameters()), "lr": float(lrs[name]), "name": name}
        for name in PARAM_GROUPS
    ]
