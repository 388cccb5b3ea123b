"""The MobileNetV2 feature extractor of the aesthetics branch, in the layout of
the NIMA PyTorch port (``mobilenetv2.pth.tar``), which is not torchvision's."""
from __future__ import annotations

import math

from torch import Tensor, nn

# (expansion t, output channels c, repeats n, stride of the first repeat s)
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
FEATURE_CHANNELS = 1280


def _conv_bn_relu(inp: int, oup: int, kernel: int, stride: int) -> nn.Sequential:
    # Stem and last layer use ReLU, not torchvision's ReLU6.
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise (3x3), project (1x1); identity shortcut when shapes allow."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        # Always 8 modules, even for expand_ratio 1 (torchvision drops the expansion there).
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


def mobilenet_v2_features() -> nn.Sequential:
    """The 19-module MobileNetV2 trunk, (B, 3, 224, 224) -> (B, 1280, 7, 7), randomly initialised."""
    layers: list[nn.Module] = [_conv_bn_relu(3, STEM_CHANNELS, 3, 2)]
    channels = STEM_CHANNELS
    for t, c, n, s in INVERTED_RESIDUAL_SETTING:
        for i in range(n):
            layers.append(InvertedResidual(channels, c, s if i == 0 else 1, t))
            channels = c
    layers.append(_conv_bn_relu(channels, FEATURE_CHANNELS, 1, 1))
    features = nn.Sequential(*layers)
    init_mobilenet_v2_(features)
    return features


def init_mobilenet_v2_(module: nn.Module) -> None:
    """The reference initialisation: convs N(0, sqrt(2 / (k*k*out))), BatchNorm weight 1, bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
