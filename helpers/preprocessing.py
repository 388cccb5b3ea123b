"""The preprocessing of the data styles: the model input's size, its ImageNet normalisation and the
reference's resize rule of each style. The data loaders, the cache, the model registry
(``models.registry``, which holds every other fact of a model) and scoring read these facts here.

A helper: it imports only ``util`` (the number of score bins).
"""
from __future__ import annotations

from dataclasses import dataclass

from util import NUM_BINS

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "INPUT_SIZE", "INPUT_SHAPE", "NUM_BINS", "TransformSpec", "TRANSFORMS"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_SIZE = 224  # fixed: the aesthetics backbone ends in a 7x7 average pool
INPUT_SHAPE = (3, INPUT_SIZE, INPUT_SIZE)


@dataclass(frozen=True)
class TransformSpec:
    """The reference's preprocessing of one data style: a resize to a fixed (height, width), for
    training a random horizontal flip and perhaps a random crop, then ToTensor and ImageNet Normalize."""

    resizer: str  # "torchvision" (transforms.Resize, bilinear with antialiasing) or "pil" (Image.resize, bicubic)
    train_size: tuple[int, int]  # (height, width) before the training crop
    train_crop: int | None  # random crop side in training, or None
    eval_size: tuple[int, int]  # (height, width) of evaluation: the model input

    def describe(self, train: bool) -> str:
        """The rule in words, for metadata and messages."""
        how = "torchvision Resize (bilinear, antialiased)" if self.resizer == "torchvision" else \
            "Pillow Image.resize (its default filter, bicubic)"
        if not train:
            return f"{how} to {self.eval_size[0]}x{self.eval_size[1]}"
        crop = f", random {self.train_crop}x{self.train_crop} crop" if self.train_crop else ""
        return f"{how} to {self.train_size[0]}x{self.train_size[1]}, random horizontal flip{crop}"


TRANSFORMS: dict[str, TransformSpec] = {
    # TAD66K-format data (TAD66K, your CSVs, the demo): Resize((256, 256)), flip, RandomCrop(224) / Resize((224, 224))
    "tad66k": TransformSpec("torchvision", (256, 256), INPUT_SIZE, (INPUT_SIZE, INPUT_SIZE)),
    # AVA: PIL resize((224, 224)), flip / PIL resize((224, 224))
    "ava": TransformSpec("pil", (INPUT_SIZE, INPUT_SIZE), None, (INPUT_SIZE, INPUT_SIZE)),
}
