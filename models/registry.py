"""The model registry (as timm's ``default_cfgs`` and pyiqa's ``DEFAULT_CONFIGS``): one entry per model
name holds every fact of the model that the rest of the project asks about: what it takes (input
size, mean and std, resize rule), what it gives (outputs and their meaning, result columns, the loss
and the accuracy threshold of its metrics), how its theme matrix is normalised, its released weight
file (name, URL, sha256) and the scores its authors report.

No torch here: the light scoring install (onnxruntime only) reads these facts too. ``create_model``
imports the network when it is called.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, replace
from typing import Any

from helpers.preprocessing import IMAGENET_MEAN, IMAGENET_STD, INPUT_SHAPE, TRANSFORMS
from util import NUM_BINS, distribution_mean

__all__ = ["PretrainedCfg", "WeightFile", "WEIGHT_FILES", "get_pretrained_cfg", "list_models", "list_variants",
           "create_model", "register_model"]

OUTPUT_KINDS = ("score", "distribution")


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


@dataclass(frozen=True)
class PretrainedCfg:
    """What one registered model takes and gives (the model carries it as ``model.pretrained_cfg``)."""

    name: str  # the registry name, e.g. "tanet-ava"
    variant: str  # the TANet variant it builds (the checkpoint's "variant")
    outputs: int  # width of the model output
    output_kind: str  # "score": one value in 0..1 (x10 on 1..10); "distribution": probabilities of 1..10
    output_meaning: str
    loss: str  # the reference's training loss (a name for training.engine.make_criterion)
    theme_normalise: str  # "softmax" over the (B, B) theme matrix, or "batchnorm" + PReLU
    isolated_theme_value: float  # the theme matrix of a lone image after normalisation
    accuracy_threshold: float  # a score above it is "good", on the metrics' scale (0..1 or 1..10)
    transform: str  # the key of helpers.preprocessing.TRANSFORMS (the reference's preprocessing of its data)
    branches: tuple[str, ...] = ("aesthetics", "theme", "rgb")
    head_dropout: float = 0.75  # the reference's dropout before each head's Linear
    weight_file: str | None = None  # the released weights (a key of WEIGHT_FILES)
    description: str = ""
    tags: tuple[str, ...] = field(default=())

    # ---- what it takes
    @property
    def input_shape(self) -> tuple[int, int, int]:
        return INPUT_SHAPE

    @property
    def mean(self) -> tuple[float, float, float]:
        return IMAGENET_MEAN

    @property
    def std(self) -> tuple[float, float, float]:
        return IMAGENET_STD

    @property
    def preprocessing(self) -> dict[str, Any]:
        """The evaluation preprocessing, as data (export metadata, the web page)."""
        return {"input_shape": [1, *INPUT_SHAPE], "layout": "NCHW, RGB, float32", "scale": "pixel / 255",
                "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                "resize": TRANSFORMS[self.transform].describe(train=False),
                "orientation": "EXIF orientation applied; transparency composited onto white"}

    # ---- what it gives
    @property
    def is_distribution(self) -> bool:
        """Whether the output is a distribution over the scores 1..10 (else one score in 0..1)."""
        return self.output_kind == "distribution"

    @property
    def result_columns(self) -> tuple[str, ...]:
        """The columns of a scored image: ``image, score, error``, with ``std, p1..p10`` for a distribution."""
        extra = ("std", *(f"p{k}" for k in range(1, NUM_BINS + 1))) if self.is_distribution else ()
        return ("image", "score", *extra, "error")

    def metric_scores(self, outputs: Any) -> Any:
        """Outputs (or targets) (N, k) -> one score each on the metrics' scale: the score (0..1) or the
        distribution's mean (1..10). Torch in, torch out; else numpy."""
        return distribution_mean(outputs) if self.is_distribution else outputs[..., 0]

    def scores_1_to_10(self, outputs: Any) -> Any:
        """Outputs (or targets) (N, k) -> scores (N,) on 1..10. Torch in, torch out; else numpy."""
        scores = self.metric_scores(outputs)
        return scores if self.is_distribution else scores * 10.0

    # ---- where its weights are
    @property
    def weights(self) -> WeightFile | None:
        return WEIGHT_FILES.get(self.weight_file) if self.weight_file else None

    @property
    def url(self) -> str | None:
        return self.weights.url if self.weights else None

    @property
    def sha256(self) -> str | None:
        return self.weights.sha256 if self.weights else None

    @property
    def reported(self) -> str | None:
        return self.weights.reported if self.weights else None

    def as_dict(self) -> dict[str, Any]:
        """Every fact as JSON-ready data (``tools/`` and the web page print it)."""
        return {"name": self.name, "variant": self.variant, "branches": list(self.branches),
                "outputs": self.outputs, "output_kind": self.output_kind, "output_meaning": self.output_meaning,
                "loss": self.loss, "theme_normalise": self.theme_normalise,
                "accuracy_threshold": self.accuracy_threshold, "head_dropout": self.head_dropout,
                "preprocessing": self.preprocessing, "result_columns": list(self.result_columns),
                "weight_file": self.weight_file, "url": self.url, "sha256": self.sha256, "reported": self.reported}


_REGISTRY: dict[str, PretrainedCfg] = {}
_ALIASES: dict[str, str] = {}  # the variant names "tad66k" and "ava" -> their full model


def register_model(cfg: PretrainedCfg, *, alias: str | None = None) -> PretrainedCfg:
    """Add a model to the registry (``alias``: another name that finds it, e.g. its variant)."""
    if cfg.output_kind not in OUTPUT_KINDS:
        raise ValueError(f"{cfg.name}: output_kind must be one of {OUTPUT_KINDS}, got {cfg.output_kind!r}")
    if cfg.transform not in TRANSFORMS:
        raise ValueError(f"{cfg.name}: unknown transform {cfg.transform!r}; expected one of {sorted(TRANSFORMS)}")
    _REGISTRY[cfg.name] = cfg
    if alias:
        _ALIASES[alias] = cfg.name
    return cfg


_TAD66K = register_model(PretrainedCfg(
    name="tanet-tad66k", variant="tad66k", outputs=1, output_kind="score",
    output_meaning="score: the mean opinion score / 10, in 0..1 (times 10 gives 1..10)",
    loss="mse", theme_normalise="softmax", isolated_theme_value=1.0, accuracy_threshold=0.5, transform="tad66k",
    weight_file="SRCC_513_LCC_531_MSE_016.pth",
    description="TANet trained on TAD66K: one score (MSE), theme matrix normalised by softmax"), alias="tad66k")
_AVA = register_model(PretrainedCfg(
    name="tanet-ava", variant="ava", outputs=NUM_BINS, output_kind="distribution",
    output_meaning=f"distribution: probabilities of the scores 1..{NUM_BINS} (its mean is the score on 1..10)",
    # At batch size 1 the reference raises; the limit of normalising one value is 0.
    loss="emd_reference", theme_normalise="batchnorm", isolated_theme_value=0.0, accuracy_threshold=5.0,
    transform="ava", weight_file="SRCC_758_LCC_765.pth",
    description="TANet trained on AVA: a 10-bin score distribution (EMD), theme matrix normalised by BatchNorm"),
    alias="ava")
# The paper's ablation (Table 5): APNet alone, with the theme branch, with the RGB attention.
for _base in (_TAD66K, _AVA):
    for _suffix, _branches in (("aesthetics", ("aesthetics",)), ("aesthetics-theme", ("aesthetics", "theme")),
                               ("aesthetics-rgb", ("aesthetics", "rgb"))):
        register_model(replace(_base, name=f"{_base.name}-{_suffix}", branches=_branches, weight_file=None,
                               description=f"{_base.description}; branches {', '.join(_branches)} (Table 5)",
                               tags=("ablation",)))


def list_models(pattern: str = "*", *, pretrained: bool = False) -> list[str]:
    """The registered model names matching a shell pattern (``tanet-ava*``); with ``pretrained=True``
    only those with released weights."""
    return sorted(n for n, c in _REGISTRY.items()
                  if fnmatch.fnmatch(n, pattern) and (not pretrained or c.weight_file is not None))


def list_variants() -> list[str]:
    """The TANet variants of the registered models (a checkpoint's ``variant``: ``ava``, ``tad66k``)."""
    return sorted({c.variant for c in _REGISTRY.values()})


def get_pretrained_cfg(name: str) -> PretrainedCfg:
    """The registry entry of a model name (or of a variant name, ``tad66k`` or ``ava``); ValueError
    naming the known models otherwise."""
    cfg = _REGISTRY.get(_ALIASES.get(name, name))
    if cfg is None:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(list_models())}")
    return cfg


def create_model(name: str, pretrained: bool = False, **overrides: Any) -> Any:
    """Build a registered TANet; ``overrides`` change its construction (``theme_fusion``, ``head_dropout``,
    ``theme_network``...). ``pretrained=True`` loads its released weights (fetched into the user cache
    when missing). The model carries its ``pretrained_cfg``."""
    cfg = get_pretrained_cfg(name)
    from .tanet import TANet  # deferred: torch

    kwargs: dict[str, Any] = {"variant": cfg.variant, "branches": cfg.branches, "head_dropout": cfg.head_dropout}
    kwargs.update(overrides)
    if kwargs["head_dropout"] != cfg.head_dropout:
        cfg = replace(cfg, head_dropout=kwargs["head_dropout"])
    model = TANet(**kwargs)
    model.pretrained_cfg = cfg
    if pretrained:
        if cfg.weight_file is None:
            raise ValueError(f"{cfg.name} has no released weights; models with weights: "
                             f"{', '.join(list_models(pretrained=True))}")
        from .weights import load_released_weights

        load_released_weights(model, cfg)
    return model
