"""TANet (He et al., IJCAI 2022), its model registry, and the helpers that load and train it.

``list_models``, ``get_pretrained_cfg`` and ``PretrainedCfg`` need no torch (the light scoring install
reads them); the network and its helpers are imported on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

from .registry import PretrainedCfg, create_model, get_pretrained_cfg, list_models, list_variants, register_model

_LAZY = {  # name -> submodule (these import torch)
    "fold_batchnorm": "folding",
    "FusedConv2d": "fusion", "conv_fusion_available": "fusion", "fuse_conv_activations": "fusion",
    "LR_SCHEDULES": "optim", "PARAM_GROUPS": "optim", "lr_factor": "optim", "parameter_groups": "optim",
    "scale_learning_rates": "optim",
    "BRANCHES": "tanet", "THEME_FUSION_MODES": "tanet", "VARIANTS": "tanet", "TANet": "tanet",
    "check_branches": "tanet",
    "checkpoints_dir": "weights", "user_cache_dir": "weights", "released_weights": "weights",
    "load_released_weights": "weights", "infer_branches": "weights", "infer_variant": "weights",
    "load_checked": "weights",
    "load_mobilenet_v2": "weights", "load_places365_resnet18": "weights", "load_tanet": "weights",
    "read_tanet_checkpoint": "weights", "resolve_weights": "weights",
}

__all__ = ["PretrainedCfg", "create_model", "get_pretrained_cfg", "list_models", "list_variants", "register_model",
           *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
