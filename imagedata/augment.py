"""The random part of the reference's training transform, done per batch on the training device:
a random horizontal flip and a random 224 crop of uint8 images (from the prepared-dataset cache),
drawn from torch's random-number generator in the reference's order, then ImageNet normalisation."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from helpers.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from helpers.preprocessing import INPUT_SIZE as MODEL_INPUT

__all__ = ["AugmentParams", "sample_augment_params", "crop_flip", "normalise", "augment_batch"]


@dataclass(frozen=True)
class AugmentParams:
    """Per-sample random choices: flip, and the crop's top-left corner in the flipped image."""

    flip: tuple[bool, ...]
    top: tuple[int, ...]
    left: tuple[int, ...]


def sample_augment_params(n: int, height: int, width: int, *, train: bool, crop: int = MODEL_INPUT,
                          generator: torch.Generator | None = None) -> AugmentParams:
    """Draw flips and crops for n images from torch's RNG, in the order the reference's
    RandomHorizontalFlip then RandomCrop draw them one image after the other (so for the same
    RNG state, the same choices); no draws when not training."""
    if not train:
        return AugmentParams((False,) * n, (0,) * n, (0,) * n)
    flips, tops, lefts = [], [], []
    for _ in range(n):
        flips.append(bool(torch.rand(1, generator=generator) < 0.5))
        if (height, width) == (crop, crop):  # RandomCrop draws nothing when the image has the crop's size
            tops.append(0), lefts.append(0)
        else:
            tops.append(int(torch.randint(0, height - crop + 1, size=(1,), generator=generator)))
            lefts.append(int(torch.randint(0, width - crop + 1, size=(1,), generator=generator)))
    return AugmentParams(tuple(flips), tuple(tops), tuple(lefts))


def crop_flip(images: Tensor, params: AugmentParams, crop: int = MODEL_INPUT) -> Tensor:
    """(B, C, H, W) -> (B, C, crop, crop): flip (where params.flip), then crop at (top, left)."""
    width = images.shape[-1]
    out = []
    for img, flip, top, left in zip(images, params.flip, params.top, params.left):
        if flip:  # column c of the flipped image is column width-1-c of the original
            out.append(img[:, top:top + crop, width - left - crop:width - left].flip(-1))
        else:
            out.append(img[:, top:top + crop, left:left + crop])
    return torch.stack(out)


def normalise(images: Tensor) -> Tensor:
    """uint8 images -> float32 ImageNet-normalised, with the same operations as ToTensor + Normalize."""
    mean = torch.as_tensor(IMAGENET_MEAN, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    std = torch.as_tensor(IMAGENET_STD, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    return images.to(torch.float32).div(255).sub_(mean).div_(std)


def augment_batch(images: Tensor, *, train: bool, generator: torch.Generator | None = None,
                  params: AugmentParams | None = None) -> Tensor:
    """A uint8 (B, 3, H, W) batch from a cache -> the model's float input: in training a random flip
    and a random 224 crop per image (params drawn from torch's RNG unless given); then normalised.
    Evaluation batches must already be 224x224."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"augment_batch needs uint8 images of shape (B, 3, H, W), got {images.dtype} "
                         f"{tuple(images.shape)}")
    b, _, h, w = images.shape
    if not train and (h, w) != (MODEL_INPUT, MODEL_INPUT):
        raise ValueError(f"evaluation images from a cache must be {MODEL_INPUT}x{MODEL_INPUT}, got {h}x{w} "
                         f"(a training cache used for evaluation?)")
    if train:
        if params is None:
            params = sample_augment_params(b, h, w, train=True, generator=generator)
        images = crop_flip(images, params)
    return normalise(images)
