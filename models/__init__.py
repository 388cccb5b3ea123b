"""TANet (He et al., IJCAI 2022) and the helpers that load and train it."""
from .folding import fold_batchnorm
from .fusion import FusedConv2d, conv_fusion_available, fuse_conv_activations
from .optim import LR_SCHEDULES, PARAM_GROUPS, lr_factor, parameter_groups, scale_learning_rates
from .tanet import BRANCHES, THEME_FUSION_MODES, VARIANTS, TANet, check_branches
from .weights import (
    checkpoints_dir,
    infer_branches,
    infer_variant,
    load_checked,
    load_mobilenet_v2,
    load_places365_resnet18,
    load_tanet,
    read_tanet_checkpoint,
    resolve_weights,
)

__all__ = [
    "FusedConv2d",
    "LR_SCHEDULES",
    "PARAM_GROUPS",
    "BRANCHES",
    "THEME_FUSION_MODES",
    "TANet",
    "VARIANTS",
    "check_branches",
    "checkpoints_dir",
    "conv_fusion_available",
    "fold_batchnorm",
    "fuse_conv_activations",
    "infer_branches",
    "infer_variant",
    "load_checked",
    "load_mobilenet_v2",
    "load_places365_resnet18",
    "load_tanet",
    "lr_factor",
    "parameter_groups",
    "read_tanet_checkpoint",
    "resolve_weights",
    "scale_learning_rates",
]
