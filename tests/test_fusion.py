"""Convolutions fused with their activation and residual sum (oneDNN, CPU): the same outputs as the
plain model, in float32 and in bfloat16, for both variants; which patterns fuse; and the trial option."""
from __future__ import annotations


import pytest
import torch
from torch import nn
from torch.nn import functional as F

from training import engine
import option
from models import FusedConv2d, TANet, conv_fusion_available, fold_batchnorm, fuse_conv_activations
from path_helpers import CPU, golden_scores, golden_tanet, perturb_batchnorm
from helpers.runtime import cpu_bf16_instructions, resolve_amp

pytestmark = pytest.mark.skipif(not conv_fusion_available(), reason="needs a PyTorch build with oneDNN")


def _tanet(variant: str, theme_fusion: str = "batch") -> TANet:
    model = golden_tanet(variant, theme_fusion=theme_fusion).eval()
    perturb_batchnorm(model)  # so that the folded biases matter
    return model


def _scores(model: nn.Module, amp: str = "none", channels_last: bool = False) -> torch.Tensor:
    return golden_scores(model, CPU, amp=amp, channels_last=channels_last, n=4)


def _count(model: nn.Module, kind: type) -> int:
    return sum(type(m) is kind for m in model.modules())


@pytest.mark.parametrize("variant", ["tad66k", "ava"])
@pytest.mark.slow
def test_fused_tanet_matches_the_plain_model_in_float32(variant):
    model = _tanet(variant)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fuse_conv_activations(fold_batchnorm(model))
    # ResNet-18: stem + 8 first convs of a block with ReLU, 8 second convs with the sum and ReLU;
    # MobileNetV2: stem, 17 expansions, 17 depthwise, the last 1x1, 10 projections with the residual sum.
    assert _count(fused, FusedConv2d) == 17 + 46
    assert _count(fused, nn.Conv2d) == 3 + 7  # ResNet downsampling, projections without a residual
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched
    assert (_scores(fused) - _scores(model)).abs().max() < 1e-5
    folded = fold_batchnorm(model)
    in_place = fuse_conv_activations(folded, copy_model=False)  # the evaluation copy is fused without a second copy
    assert in_place is folded and _count(in_place, FusedConv2d) == 17 + 46
    assert (_scores(in_place) - _scores(fused)).abs().max() == 0


@pytest.mark.skipif(not conv_fusion_available(torch.bfloat16),
                    reason="oneDNN's bfloat16 convolution needs a CPU with AVX-512 or AVX-NE-CONVERT")
@pytest.mark.parametrize("theme_fusion", ["batch", "isolated"])
def test_fused_bfloat16_path_stays_close_to_float32(theme_fusion):
    model = _tanet("tad66k", theme_fusion)
    ref = _scores(model)
    folded = fold_batchnorm(model).to(memory_format=torch.channels_last)
    fused = fuse_conv_activations(fold_batchnorm(model), torch.bfloat16).to(memory_format=torch.channels_last)
    assert fused.theme_fusion == theme_fusion
    fast = _scores(fused, amp="bf16", channels_last=True)
    assert torch.isfinite(fast).all() and (fast - ref).abs().max() < 0.05
    # Fusing only moves bfloat16 rounding: it stays as close to the unfused bfloat16 path.
    assert (fast - _scores(folded, amp="bf16", channels_last=True)).abs().max() < 0.02
    assert all(m.weight.dtype == torch.bfloat16 for m in fused.modules() if isinstance(m, FusedConv2d))


class _Block(nn.Module):
    """The patterns the pass knows, and the ones it must leave alone."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a, self.b, self.c, self.d, self.e = (nn.Conv2d(4, 4, 3, padding=1) for _ in range(5))
        for conv in (self.a, self.b, self.c, self.d, self.e):
            conv.weight.data = torch.randn(conv.weight.shape, generator=g) * 2.0  # outputs well beyond 6
        self.bn = nn.Identity()  # a folded BatchNorm between a conv and its activation
        self.relu6 = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = self.relu6(self.bn(self.a(x)))  # conv -> ReLU6 (clamped to [0, 6])
        z = F.relu(self.b(y) + x)  # conv + residual -> ReLU
        w = self.c(z) + y  # conv + residual
        v = self.d(w)
        u = torch.sigmoid(v) * v  # an activation oneDNN is not asked to fuse: left alone
        t = self.e(u)
        return torch.relu(t), t  # a conv whose output is used twice: left alone


def test_fusion_patterns_on_a_small_module():
    block = _Block().eval()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    fused = fuse_conv_activations(block)
    kinds = {m.extra_repr().split(", ")[-2] for m in fused.modules() if isinstance(m, FusedConv2d)}
    assert kinds == {"hardtanh(conv)", "relu(conv + residual)", "identity(conv + residual)"}
    assert _count(fused, nn.Conv2d) == 2
    with torch.inference_mode():
        for got, want in zip(fused(x), block(x)):
            assert (got - want).abs().max() < 1e-4
        assert fused(x)[0].max() > 0 and block.relu6(block.a(x)).max() == 6.0  # the clamp is exercised


def test_fusion_needs_onednn(monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert not conv_fusion_available()
    with pytest.raises(RuntimeError, match="oneDNN"):
        fuse_conv_activations(_Block())
    assert not engine.fuses_conv(True, CPU, "none")


def test_trial_option_fuses_on_the_cpu_only():
    args = option.apply_dataset_defaults(option.init(["--dataset", "demo"]))
    args.amp = resolve_amp(args.amp, CPU)  # as main_nni does once the device is known
    assert args.fold_bn and args.fuse_conv  # the demo recipe uses it
    # bf16 fuses where the CPU has the instructions (TANET_CPU_BF16=1 only emulates the choice)
    assert engine.fuses_conv(args.fuse_conv, CPU, args.amp) == (args.amp == "none" or cpu_bf16_instructions())
    assert engine.fuses_conv(args.fuse_conv, CPU, "none")
    assert not engine.fuses_conv(args.fuse_conv, torch.device("cuda"), args.amp)
    reference = option.apply_dataset_defaults(option.init(["--dataset", "tad66k"]))
    assert not reference.fuse_conv and not engine.fuses_conv(reference.fuse_conv, CPU, "none")
    bad = option.apply_dataset_defaults(option.init(["--dataset", "demo", "--no-fold_bn"]))
    with pytest.raises(ValueError, match="--fuse_conv needs --fold_bn"):
        option.check_options(bad)
    option.check_options(option.apply_dataset_defaults(option.init(["--dataset", "demo", "--no-fold_bn",
                                                                     "--no-fuse_conv"])))
