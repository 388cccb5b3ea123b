"""Helpers of the fast-path tests: TANet with the golden weights, a golden batch and its scores, and
BatchNorm statistics far from the identity (so that folding them has work to do)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from training.engine import infer
from golden import golden_input, golden_state_dict
from models import TANet
from helpers.runtime import cpu_bf16_instructions, cpu_has_native_bf16

CPU = torch.device("cpu")
# bfloat16 on a CPU without bfloat16 instructions is an emulation, about 10x slower than float32 and
# rounded differently; the project uses float32 there (--amp auto), so those paths are not tested there.
needs_native_bf16 = pytest.mark.skipif(not cpu_has_native_bf16(),
                                       reason="this CPU has no bfloat16 instructions (AVX512-BF16 or AMX)")
# Tolerances measured with the instructions' own rounding: emulated bf16 (TANET_CPU_BF16=1 on a CPU
# without them) rounds the AVA theme ResNet's logits differently, and the per-batch normalisation of
# the theme matrix amplifies that (0.062 against < 0.05 on the perturbed golden model, 2026-12-06).
needs_bf16_instructions = pytest.mark.skipif(not cpu_bf16_instructions(),
                                             reason="the CPU has no bfloat16 instructions (AVX512-BF16 or AMX)")


def golden_tanet(variant: str = "tad66k", device: torch.device = CPU, channels_last: bool = False,
                 frozen: bool = True, theme_fusion: str = "batch") -> TANet:
    model = TANet(variant, theme_fusion=theme_fusion)
    model.load_state_dict(golden_state_dict(variant), strict=True)
    if frozen:
        model.freeze_theme_backbone()
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def golden_batches(n: int = 3) -> list[dict]:
    x = golden_input(n)
    return [{"image": x, "target": torch.linspace(0.2, 0.8, n)[:, None], "index": torch.arange(n),
             "path": [f"p{i}" for i in range(n)], "theme": [""] * n}]


def golden_scores(model: TANet, device: torch.device = CPU, amp: str = "none", channels_last: bool = False,
                  n: int = 3) -> torch.Tensor:
    """``predict``'s outputs for the golden batch of ``n`` images."""
    out = infer(model, golden_batches(n), device, amp=amp, channels_last=channels_last, progress=False)
    return torch.from_numpy(np.stack(out.output))


def perturb_batchnorm(model: TANet, seed: int = 5) -> None:
    """Every BatchNorm2d's running statistics and scale drawn far from the identity, in place."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
