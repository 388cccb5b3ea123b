"""What a TANet takes and gives, in one place (as timm's pretrained configs): per model variant the
input, its normalisation and resize rule and what the outputs mean; per weight file where it comes
from. The data loaders, the cache, scoring and the ONNX export read these facts here.

A helper: it imports only ``util`` (the score distribution's mean).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from util import NUM_BINS, distribution_mean

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "INPUT_SIZE", "INPUT_SHAPE", "NUM_BINS", "TransformSpec", "TRANSFORMS",
    "VariantPreset", "VARIANT_PRESETS", "WeightFile", "WEIGHT_FILES", "RELEASED", "metric_scores", "scores_1_to_10",
]

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


@dataclass(frozen=True)
class VariantPreset:
    """The input and output contract of one TANet variant."""

    name: str
    outputs: int  # width of the model output
    output_meaning: str
    transform: str  # the key of TRANSFORMS that scoring uses for this variant's own images
    loss: str  # the reference's training loss

    @property
    def preprocessing(self) -> dict[str, Any]:
        """The evaluation preprocessing, as data (export metadata, the web page)."""
        spec = TRANSFORMS[self.transform]
        return {"input_shape": [1, *INPUT_SHAPE], "layout": "NCHW, RGB, float32", "scale": "pixel / 255",
                "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "resize": spec.describe(train=False),
                "orientation": "EXIF orientation applied; transparency composited onto white"}


VARIANT_PRESETS: dict[str, VariantPreset] = {
    "tad66k": VariantPreset("tad66k", 1, "score: the mean opinion score / 10, in 0..1 (times 10 gives 1..10)",
                            "tad66k", "mse"),
    "ava": VariantPreset("ava", NUM_BINS, f"distribution: probabilities of the scores 1..{NUM_BINS} "
                                          f"(its mean is the score on 1..10)", "ava", "emd_reference"),
}


@dataclass(frozen=True)
class WeightFile:
    """One downloadable reference weight file."""

    name: str
    kind: str  # "places365_resnet18", "mobilenet_v2" or "tanet"
    variant: str | None  # the TANet variant, for kind "tanet"
    url: str
    sha256: str | None = None  # not pinned: no copy of the files could be checked yet
    reported: str | None = None  # what the file scores, as quoted by its authors


_AUTHORS_REPO = "https://github.com/woshidandan/TANet-image-aesthetics-and-quality-assessment/raw/HEAD"
WEIGHT_FILES: dict[str, WeightFile] = {
    w.name: w
    for w in (
        WeightFile("resnet18_places365.pth.tar", "places365_resnet18", None,
                   "http://places2.csail.mit.edu/models_places365/resnet18_places365.pth.tar"),
        WeightFile("mobilenetv2.pth.tar", "mobilenet_v2", None,
                   "https://s3-us-west-1.amazonaws.com/models-nima/mobilenetv2.pth.tar"),
        WeightFile("SRCC_513_LCC_531_MSE_016.pth", "tanet", "tad66k",
                   f"{_AUTHORS_REPO}/code/TAD66K/SRCC_513_LCC_531_MSE_016.pth",
                   reported="TAD66K test: SRCC 0.507, PLCC 0.526 (authors' issue tracker, issue 19)"),
        WeightFile("SRCC_758_LCC_765.pth", "tanet", "ava", f"{_AUTHORS_REPO}/code/AVA/SRCC_758_LCC_765.pth",
                   reported="AVA test: SRCC 0.755, PLCC 0.764, accuracy 0.800 (authors' issue tracker, issue 19)"),
    )
}
RELEASED = {w.variant: w.name for w in WEIGHT_FILES.values() if w.kind == "tanet"}


def metric_scores(outputs: Any, variant: str) -> Any:
    """Model outputs (or targets) (N, 1) or (N, 10) -> one score each, on the scale the reference's
    metrics use: the output itself, 0..1 (``tad66k``), or the mean of the distribution, 1..10 (``ava``).
    Torch in, torch out; else numpy."""
    if variant not in VARIANT_PRESETS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {sorted(VARIANT_PRESETS)}")
    return outputs[..., 0] if variant == "tad66k" else distribution_mean(outputs)


def scores_1_to_10(outputs: Any, variant: str) -> Any:
    """Model outputs (or targets) (N, 1) or (N, 10) -> scores (N,) on 1..10: the score times 10
    (``tad66k``), or the mean of the distribution (``ava``). Torch in, torch out; else numpy."""
    scores = metric_scores(outputs, variant)
    return scores * 10.0 if variant == "tad66k" else scores

