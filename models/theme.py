"""Theme understanding branch (TUNet, "L1"-"L3" in the reference).

A Places365 ResNet-18 gives 365 scene logits ``s``; the hyper-network ("L1")
turns them into a weight matrix ``W`` (B, 100) and bias ``c`` (B, 1); the target
network ("L2") turns them into hidden features ``h`` (B, 100); "L3" multiplies
the two across the batch, ``q = h @ W.T + c`` (B, B), so that an image's theme
feature depends on the other images of its batch.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .resnet import ResNet18

PLACES365_CLASSES = 365
THEME_HIDDEN = 100
THEME_FEATURES = 10


def places365_resnet18() -> nn.Module:
    """A randomly initialised ResNet-18 (torchvision's layout and initialisation) with a 365-way scene classifier."""
    return ResNet18(num_classes=PLACES365_CLASSES)


class HyperNet(nn.Module):
    """"L1": scene logits -> the target layer's weights ``W`` (B, 100) and bias ``c`` (B, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.last_out_w = nn.Linear(PLACES365_CLASSES, THEME_HIDDEN)
        self.last_out_b = nn.Linear(PLACES365_CLASSES, 1)

    def forward(self, s: Tensor) -> tuple[Tensor, Tensor]:
        return self.last_out_w(s), self.last_out_b(s)


class TargetNet(nn.Module):
    """"L2" and "L3": hidden theme features, then the batch-coupled product with the hyper-weights."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(PLACES365_CLASSES, THEME_HIDDEN)
        self.bn1 = nn.BatchNorm1d(THEME_HIDDEN)
        self.relu1 = nn.PReLU()
        self.drop1 = nn.Dropout(p=0.5)
        # Registered (and saved) in both variants, used by the ``ava`` variant only.
        self.relu7 = nn.PReLU()

    def hidden(self, s: Tensor) -> Tensor:
        """"L2": h = Dropout(PReLU(BatchNorm(fc1(s)))), (B, 100).

        A training batch of one image (where the reference raises) is normalised with the running
        statistics, which it leaves as they are; batches of two or more are the reference's."""
        z = self.fc1(s)
        if self.training and z.shape[0] == 1:
            bn = self.bn1
            z = F.batch_norm(z, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps)
        else:
            z = self.bn1(z)
        return self.drop1(self.relu1(z))

    def forward(self, h: Tensor, w: Tensor, c: Tensor, normalise: str) -> Tensor:
        """"L3": q[i, j] = h_i . W_j + c_i, (B, B), then a softmax or the per-batch normalisation."""
        q = F.linear(h, w, c)  # c is (B, 1): broadcast along rows
        if normalise == "softmax":
            return torch.softmax(q, dim=1)
        # The reference builds a fresh BatchNorm1d(B) in every call: always batch
        # statistics (train and eval), biased variance, eps 1e-5, identity affine.
        q = F.batch_norm(q, None, None, training=True, eps=1e-5)
        return self.relu7(q)


def pool_theme(q: Tensor, pool: nn.Module) -> Tensor:
    """(B, B) -> (B, 10): each row adaptively averaged into 10 bins (the reference pools
    the 3-D (B, B, 1) tensor as an unbatched (C, H, W) image)."""
    return pool(q.unsqueeze(2)).squeeze(2)
