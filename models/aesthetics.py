"""Aesthetics perceiving branch (APNet, "L5" in the reference): MobileNetV2 -> 10 features."""
from __future__ import annotations

from torch import Tensor, nn

from .mobilenet_v2 import FEATURE_CHANNELS, mobilenet_v2_features

AESTHETICS_FEATURES = 10


class AestheticsBranch(nn.Module):
    """``base_model`` = (MobileNetV2 trunk, 7x7 average pool); ``head`` = ReLU, Dropout(0.75), Linear(1280, 10)."""

    def __init__(self, head_dropout: float = 0.75) -> None:
        super().__init__()
        # Index 1 is the pool: the checkpoint keys are ``base_model.0.*``.
        self.base_model = nn.Sequential(mobilenet_v2_features(), nn.AvgPool2d(7))
        # (code != paper) ReLU, not PReLU; no softmax.
        self.head = nn.Sequential(
            nn.ReLU(),
            nn.Dropout(p=head_dropout),
            nn.Linear(FEATURE_CHANNELS, AESTHETICS_FEATURES),
        )

    @property
    def backbone(self) -> nn.Sequential:
        """The MobileNetV2 trunk (the part the ImageNet weights go into)."""
        return self.base_model[0]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.base_model(x).flatten(1))
