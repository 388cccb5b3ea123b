"""RGB-distribution-aware attention branch (RGBNet, "L4" in the reference)."""
from __future__ import annotations

from torch import Tensor, nn

PATCH_GRID = 12  # 12 x 12 = 144 patch colours
RGB_FEATURES = 10


def rgb_similarity(pooled: Tensor) -> Tensor:
    """Cosine similarity of every pair of patch colours: (B, 3, 12, 12) -> (B, 144, 144).

    (code != paper) No query/key projections and no 1/sqrt(d) scaling; the
    1e-8 clamp applies to the product of the two norms.
    """
    v = pooled.flatten(2).transpose(1, 2)  # (B, 144, 3)
    norms = v.norm(dim=2, keepdim=True)  # (B, 144, 1)
    return (v @ v.transpose(1, 2)) / (norms @ norms.transpose(1, 2)).clamp(min=1e-8)


def rgb_attention_head(dropout: float = 0.75) -> nn.Sequential:
    """``head_rgb``: ReLU, Dropout(0.75), Linear(144*144, 10), Softmax."""
    # (code != paper) ReLU, not PReLU.
    return nn.Sequential(
        nn.ReLU(),
        nn.Dropout(p=dropout),
        nn.Linear(PATCH_GRID**2 * PATCH_GRID**2, RGB_FEATURES),
        nn.Softmax(dim=1),
    )

