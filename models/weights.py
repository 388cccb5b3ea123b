"""The reference weight files (listed in ``models.registry.WEIGHT_FILES``): finding or fetching them, and
loading them into TANet.

Every file is read with ``torch.load(weights_only=True)`` (through ``safe_io.safe_torch_load``);
a file that needs full unpickling is refused unless the caller opts in explicitly.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from helpers.download import DownloadError, download
from helpers.safe_io import CheckpointError, safe_torch_load

from .registry import WEIGHT_FILES, PretrainedCfg, WeightFile, get_pretrained_cfg, list_models, list_variants
from .tanet import BRANCHES, TANet, check_branches

REPO_ROOT = Path(__file__).resolve().parent.parent
CHECKPOINTS_ENV = "TANET_CHECKPOINTS"


def checkpoints_dir(override: str | os.PathLike | None = None) -> Path:
    """Where weight files live: ``override``, else ``$TANET_CHECKPOINTS``, else the repo's ``checkpoints/``."""
    if override:
        return Path(override)
    env = os.environ.get(CHECKPOINTS_ENV)
    return Path(env) if env else REPO_ROOT / "checkpoints"


def user_cache_dir() -> Path:
    """Where ``--pretrained`` puts released weights: ``$TANET_CHECKPOINTS``, else the torch hub folder's
    ``checkpoints/`` (never the checkout)."""
    env = os.environ.get(CHECKPOINTS_ENV)
    return Path(env) if env else Path(torch.hub.get_dir()) / "checkpoints"


def _fetch(entry: WeightFile, local: Path, sha256: str | None, progress: bool) -> Path:
    try:
        return download(entry.url, local, sha256=sha256 or entry.sha256, progress=progress)
    except DownloadError as exc:
        raise DownloadError(f"{exc}; get {entry.name} from {entry.url} by other means and put it into "
                            f"{local.parent}") from None


def released_weights(cfg: PretrainedCfg, *, directory: str | os.PathLike | None = None,
                     download_missing: bool = False, progress: bool = True) -> Path:
    """The released weight file of a registry model: in ``directory`` when given, else in the user cache
    (``user_cache_dir``) or the checkout's ``checkpoints/``; fetched (sha256-checked when pinned) into
    ``directory`` or the user cache when missing and ``download_missing``."""
    entry = cfg.weights
    if entry is None:
        raise FileNotFoundError(f"{cfg.name} has no released weights; models with weights: "
                                f"{', '.join(list_models(pretrained=True))}")
    folders = [Path(directory)] if directory else [user_cache_dir(), REPO_ROOT / "checkpoints"]
    for folder in folders:
        if (folder / entry.name).is_file():
            return folder / entry.name
    if not download_missing:
        raise FileNotFoundError(f"{entry.name} (the weights of {cfg.name}) is not in "
                                f"{' nor '.join(str(f) for f in folders)}; pass --pretrained to fetch it from "
                                f"{entry.url} into {folders[0]}")
    return _fetch(entry, folders[0] / entry.name, None, progress)


def load_released_weights(model: TANet, cfg: PretrainedCfg, *, directory: str | os.PathLike | None = None,
                          progress: bool = True) -> Path:
    """Load a registry model's released weights into ``model`` (fetched into the user cache when
    missing); the file's path."""
    path = released_weights(cfg, directory=directory, download_missing=True, progress=progress)
    state, _ = read_tanet_checkpoint(path)
    _load_tanet_state(model, state, str(path))
    return path


def resolve_weights(
    name_or_path: str | os.PathLike,
    *,
    directory: str | os.PathLike | None = None,
    download_missing: bool = False,
    sha256: str | None = None,
    progress: bool = True,
) -> Path:
    """A weight file's path: an existing path as is; a model's registry name (``tanet-ava``) its released
    file (``released_weights``); else a weight file's name looked up in the checkpoints folder and
    downloaded there when ``download_missing``."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if str(name_or_path) in list_models():
        cfg = get_pretrained_cfg(str(name_or_path))
        if sha256 is None:
            return released_weights(cfg, directory=directory, download_missing=download_missing, progress=progress)
        return resolve_weights(cfg.weight_file or str(name_or_path), directory=directory,
                               download_missing=download_missing, sha256=sha256, progress=progress)
    if path.is_dir():  # a run folder, most likely: say which of its files to name
        held = sorted(p.name for p in path.glob("*.pth") if p.is_file())
        hint = f" (it holds {', '.join(held)})" if held else ""
        raise FileNotFoundError(f"weight file {path} is a folder, not a weight file: name the checkpoint file in "
                                f"it{hint}")
    entry = WEIGHT_FILES.get(path.name) if path.name == str(name_or_path) else None
    if entry is None:
        known = ", ".join([*WEIGHT_FILES, *list_models(pretrained=True)])
        raise FileNotFoundError(f"weight file {str(name_or_path)!r} not found (registry names: {known})")
    local = checkpoints_dir(directory) / entry.name
    if local.is_file():
        return local
    if not download_missing:
        raise FileNotFoundError(
            f"{entry.name} is not in {local.parent}; download it from {entry.url} "
            f"into that folder, or pass --download to fetch it"
        )
    return _fetch(entry, local, sha256, progress)


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
    """Load the ImageNet ``mobilenetv2.pth.tar`` (``features.*``; ``classifier.*`` ignored) into the aesthetics
    branch."""
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


_THEME_NETWORK = ("res365_last.", "hypernet.", "tygertnet.")


def infer_branches(state_dict: Mapping[str, torch.Tensor]) -> tuple[str, ...]:
    """The branches a TANet state_dict holds: its theme network's and RGB head's keys tell."""
    has = {"theme": any(k.startswith(_THEME_NETWORK) for k in state_dict),
           "rgb": any(k.startswith("head_rgb.") for k in state_dict)}
    return tuple(b for b in BRANCHES if b == "aesthetics" or has.get(b))


def load_tanet(path: str | os.PathLike, *, variant: str | None = None, branches: tuple[str, ...] | None = None,
               theme_fusion: str = "batch", theme_network: bool = True, allow_unsafe: bool = False,
               model_class: type[TANet] = TANet, head_dropout: float | None = None) -> tuple[TANet, dict]:
    """The TANet of a checkpoint (released or ours) with its weights loaded strictly, and the
    checkpoint's metadata (``variant``, ``branches`` and, for ours, ``options``, ``epoch``, ...).

    The variant and the branches are read from the file; ``variant`` and ``branches`` must agree with
    them (CheckpointError naming both), and the variant is needed only when the file cannot tell.
    ``theme_network=False`` (isolated scoring) leaves the theme ResNet and its heads out: not built,
    not loaded. ``head_dropout``: the heads' dropout, by default the one the checkpoint was trained with
    (its ``options``), else the reference's.
    """
    source = str(path)
    state, meta = read_tanet_checkpoint(path, allow_unsafe=allow_unsafe)
    held = check_branches(meta["branches"]) if meta.get("branches") else infer_branches(state)
    meta["branches"] = list(held)
    if branches is not None and check_branches(branches) != held:
        raise CheckpointError(f"checkpoint {source} is a TANet with the branches {','.join(held)}, but "
                              f"{','.join(check_branches(branches))} were asked for (--branches)")
    known = meta.get("variant")
    if variant is not None and variant not in list_variants():
        raise CheckpointError(f"unknown variant {variant!r}; expected one of {list_variants()}")
    if known is not None and known not in list_variants():
        raise CheckpointError(f"checkpoint {source} names an unknown variant {known!r}")
    if known is not None and variant is not None and known != variant:
        raise CheckpointError(f"checkpoint {source} is a {known!r} model, but variant {variant!r} was asked for; "
                              f"drop --variant (it is read from the checkpoint) or pick the right file")
    if known is None and variant is None:
        raise CheckpointError(f"the variant of checkpoint {source} cannot be told from the file; pass --variant")
    if head_dropout is None:
        options = meta.get("options") if isinstance(meta.get("options"), Mapping) else {}
        saved = options.get("head_dropout")
        head_dropout = float(saved) if saved is not None else get_pretrained_cfg(known or variant).head_dropout
    model = model_class(known or variant, theme_fusion=theme_fusion, branches=held, theme_network=theme_network,
                        head_dropout=head_dropout)
    _load_tanet_state(model, state, source, held)
    return model, meta


def _load_tanet_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str,
                      branches: tuple[str, ...] | None = None) -> None:
    """Load a TANet state_dict strictly (leaving out the theme network's keys where the model has none)."""
    held = getattr(model, "branches", ()) if branches is None else branches
    hint = "" if any(k.startswith("mobileNet.") for k in state) else \
        "this does not look like a TANet checkpoint (a backbone file? use the backbone loaders)"
    if "theme" in held and not getattr(model, "has_theme_network", True):
        state = {k: v for k, v in state.items() if not k.startswith(_THEME_NETWORK)}
    load_checked(model, state, source, hint)
