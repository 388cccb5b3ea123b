"""Inference copies with every BatchNorm folded into the convolution before it (a speed path)."""
from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` in which each ``BatchNorm2d`` that directly follows a ``Conv2d``
    (the next child of the same parent: TANet's ResNet-18 and MobileNetV2 are built so) is folded
    into that convolution's weights and replaced by ``Identity``.

    Same outputs as ``model.eval()`` up to float rounding; for inference only (the copy's
    parameters are new tensors, and folded BatchNorm statistics no longer update).
    """
    folded = copy.deepcopy(model).eval()
    _fold_children(folded)
    return folded


def _fold_children(module: nn.Module) -> None:
    previous: tuple[str, nn.Module] | None = None
    for name, child in list(module.named_children()):
        if (isinstance(child, nn.BatchNorm2d) and previous is not None and isinstance(previous[1], nn.Conv2d)
                and child.track_running_stats and previous[1].out_channels == child.num_features):
            setattr(module, previous[0], fuse_conv_bn_eval(previous[1], child))
            setattr(module, name, nn.Identity())
            previous = None
            continue
        _fold_children(child)
        previous = (name, child)
