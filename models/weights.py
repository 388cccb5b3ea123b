"""The reference weight files: where to get them, and how to load them into TANet.

Every file is read with ``torch.load(weights_only=True)`` (through ``util.safe_torch_load``);
a file that needs full unpickling is refused unless the caller opts in explicitly.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from download import download
from safe_io import CheckpointError, safe_torch_load

REPO_ROOT = Path(__file__).resolve().parent.parent
CHECKPOINTS_ENV = "TANET_CHECKPOINTS"
_AUTHORS_REPO = "https://github.com/woshidandan/TANet-image-aesthetics-and-quality-assessment/raw/HEAD"


@dataclass(frozen=True)
class WeightFile:
    """One downloadable reference file."""

    name: str
    kind: str  # "places365_resnet18", "mobilenet_v2" or "tanet"
    variant: str | None  # the TANet variant, for kind "tanet"
    url: str
    sha256: str | None = None  # not pinned yet: nobody here could download them


REGISTRY: dict[str, WeightFile] = {
    w.name: w
    for w in (
        WeightFile(
            "resnet18_places365.pth.tar",
            "places365_resnet18",
            None,
            "http://places2.csail.mit.edu/models_places365/resnet18_places365.pth.tar",
        ),
        WeightFile(
            "mobilenetv2.pth.tar",
            "mobilenet_v2",
            None,
            "https://s3-us-west-1.amazonaws.com/models-nima/mobilenetv2.pth.tar",
        ),
        WeightFile(
            "SRCC_513_LCC_531_MSE_016.pth",
            "tanet",
            "tad66k",
            f"{_AUTHORS_REPO}/code/TAD66K/SRCC_513_LCC_531_MSE_016.pth",
        ),
        WeightFile(
            "SRCC_758_LCC_765.pth",
            "tanet",
            "ava",
            f"{_AUTHORS_REPO}/code/AVA/SRCC_758_LCC_765.pth",
        ),
    )
}
RELEASED = {w.variant: w.name for w in REGISTRY.values() if w.kind == "tanet"}


def checkpoints_dir(override: str | os.PathLike | None = None) -> Path:
    """Where weight files live: ``override``, else ``$TANET_CHECKPOINTS``, else the repo's ``checkpoints/``."""
    if override:
        return Path(override)
    env = os.environ.get(CHECKPOINTS_ENV)
    return Path(env) if env else REPO_ROOT / "checkpoints"


def resolve_weights(
    name_or_path: str | os.PathLike,
    *,
    directory: str | os.PathLike | None = None,
    download_missing: bool = False,
    sha256: str | None = None,
    progress: bool = True,
) -> Path:
    """A weight file's path: an existing path as is, else a registry name looked up in the
    checkpoints folder and downloaded there when ``download_missing``."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    entry = REGISTRY.get(path.name) if path.name == str(name_or_path) else None
    if entry is None:
        known = ", ".join(REGISTRY)
        raise FileNotFoundError(f"weight file {str(name_or_path)!r} not found (registry names: {known})")
    local = checkpoints_dir(directory) / entry.name
    if local.is_file():
        return local
    if not download_missing:
        raise FileNotFoundError(
            f"{entry.name} is not in {local.parent}; download it from {entry.url} "
            f"into that folder, or pass --download to fetch it"
        )
    return download(entry.url, local, sha256=sha256 or entry.sha256, progress=progress)


def infer_variant(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """``tad66k`` or ``ava`` from the fusion head's shape, None when it cannot be told."""
    weight = state_dict.get("head.2.weight")
    if weight is None or weight.ndim != 2:
        return None
    return {1: "tad66k", 10: "ava"}.get(int(weight.shape[0]))


def load_checked(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, hint: str = "") -> None:
    """``load_state_dict(strict=True)`` with an error that names what is missing or unexpected."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} != {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and hasattr(state_dict[k], "shape") and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if keys:
                more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
                parts.append(f"{len(keys)} {label} keys: {', '.join(keys[:3])}{more}")
        raise CheckpointError(f"{source} does not fit: {'; '.join(parts)}{'; ' + hint if hint else ''}")
    module.load_state_dict(state_dict, strict=True)


def _read(path: str | os.PathLike, allow_unsafe: bool) -> object:
    return safe_torch_load(path, allow_unsafe=allow_unsafe, map_location="cpu")


def _state_dict_of(obj: object, source: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    elif isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{source} holds no state_dict (a mapping of names to tensors)")
    return dict(obj)


def load_places365_resnet18(model: nn.Module, path: str | os.PathLike, *, allow_unsafe: bool = False) -> None:
    """Load ``resnet18_places365.pth.tar`` (``state_dict`` keys prefixed ``module.``) into the theme branch."""
    source = str(path)
    state = _state_dict_of(_read(path, allow_unsafe), source)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    load_checked(
        model.res365_last,
        state,
        source,
        "expected the Places365 ResNet-18 (resnet18_places365.pth.tar), not a TANet or MobileNetV2 file",
    )


def load_mobilenet_v2(model: nn.Module, path: str | os.PathLike, *, allow_unsafe: bool = False) -> None:
    """Load the ImageNet ``mobilenetv2.pth.tar`` (``features.*``; ``classifier.*`` ignored) into the aesthetics branch."""
    source = str(path)
    state = _state_dict_of(_read(path, allow_unsafe), source)
    features = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}
    load_checked(
        model.mobileNet.base_model[0],
        features,
        source,
        "expected the NIMA-layout ImageNet MobileNetV2 (mobilenetv2.pth.tar, keys features.*)",
    )


def read_tanet_checkpoint(path: str | os.PathLike, *, allow_unsafe: bool = False) -> tuple[dict, dict]:
    """A TANet checkpoint's state_dict and metadata (``variant`` where it can be known).

    Accepts the released plain state_dicts and this project's training checkpoints
    (a dict with ``model`` and metadata such as ``variant``, ``epoch``, ``options``).
    """
    source = str(path)
    obj = _read(path, allow_unsafe)
    state = _state_dict_of(obj, source)
    meta = {k: v for k, v in obj.items() if k not in ("model", "state_dict")} if "model" in obj else {}
    variant = meta.get("variant") or infer_variant(state)
    meta["variant"] = variant
    return state, meta


def load_tanet_weights(model: nn.Module, path: str | os.PathLike, *, allow_unsafe: bool = False) -> dict:
    """Load a whole TANet checkpoint (released or ours) with ``strict=True``; returns its metadata."""
    state, meta = read_tanet_checkpoint(path, allow_unsafe=allow_unsafe)
    hint = ""
    if meta["variant"] and meta["variant"] != model.variant:
        hint = f"this is a {meta['variant']!r} checkpoint but the model is {model.variant!r} (check --variant)"
    elif not any(k.startswith("mobileNet.") for k in state):
        hint = "this does not look like a TANet checkpoint (a backbone file? use the backbone loaders)"
    load_checked(model, state, str(path), hint)
    return meta
