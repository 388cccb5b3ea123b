"""The report's runs of the model: the test split through the run's own evaluation path (its theme
fusion, precision, folding and fusing, batch size), and the RGB-attention inputs of a few images."""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from helpers.console import progress as progress_bar
from dataset import collate_skip_none
from helpers.runtime import autocast, to_device
from training.engine import evaluation_model, make_loader
from models import TANet, get_pretrained_cfg
from models.rgb_attention import rgb_similarity

from .report_error import ReportError

# The options that decide how evaluation computes (saved in a run's checkpoint), and their defaults.
EVALUATION_OPTIONS = {"theme_fusion": "batch", "amp": "none", "fold_bn": False, "fuse_conv": False,
                      "channels_last": False}


@dataclass
class ModelPass:
    """The model outputs of the first images of the split, in file order, and how they were computed."""

    index: list[int]
    output: np.ndarray  # (N, 1) or (N, 10)
    hidden: np.ndarray | None  # (N, 100) theme hidden nodes; None for a model without the theme branch
    path: dict  # EVALUATION_OPTIONS as used, and the batch size and device

    def pred(self, variant: str) -> np.ndarray:
        """Predicted score on 1..10."""
        return get_pretrained_cfg(variant).scores_1_to_10(self.output)


def evaluation_settings(opts: Mapping, device: torch.device) -> dict:
    """The evaluation path of a run's options on ``device`` (fp16 falls back to float32 off CUDA)."""
    path = {k: opts.get(k, v) if opts.get(k) is not None else v for k, v in EVALUATION_OPTIONS.items()}
    if path["amp"] in ("fp16", "auto") and device.type != "cuda":
        path["amp"] = "none"
    return path


@torch.no_grad()
def model_pass(model: TANet, dataset, *, batch_size: int, limit: int | None, device: torch.device,
               num_workers: int, progress: bool, settings: Mapping | None = None) -> ModelPass:
    """The run's protocol: batches of ``batch_size`` in file order through the model as the run's
    evaluation ran it (``settings``: see ``evaluation_settings``); the theme hidden nodes as well
    (per image, whatever the theme fusion)."""
    path = dict(EVALUATION_OPTIONS, **(settings or {}))
    model.eval()
    model.theme_fusion = path["theme_fusion"]
    run = evaluation_model(model, device, fold_bn=path["fold_bn"], fuse_conv=path["fuse_conv"], amp=path["amp"],
                           channels_last=path["channels_last"])
    n = len(dataset) if limit is None else min(limit, len(dataset))
    subset = torch.utils.data.Subset(dataset, range(n))
    loader = make_loader(subset, batch_size=batch_size, train=False, num_workers=num_workers, device=device,
                         collate_fn=collate_skip_none)
    index, outputs, hidden = [], [], []
    for batch in progress_bar(loader, desc="report", unit="batch", enabled=progress):
        if batch is None:
            continue
        x = to_device(batch["image"], device, path["channels_last"])
        with warnings.catch_warnings(), autocast(device, path["amp"]):
            warnings.simplefilter("ignore", RuntimeWarning)  # ava at batch size 1: the isolated value
            out = run.forward_branches(x)
            h = out["theme_hidden"]
            if h is None and "theme" in run.branches:  # isolated fusion or a lone ava image: per image anyway
                h = run.tygertnet.hidden(run.res365_last(x))
        index += [int(i) for i in batch["index"]]
        outputs.append(out["output"].float().cpu().numpy())
        if h is not None:
            hidden.append(h.float().cpu().numpy())
    if not index:
        raise ReportError(f"no image of {dataset.source} could be read for the model pass")
    return ModelPass(index, np.concatenate(outputs), np.concatenate(hidden) if hidden else None,
                     {**path, "batch_size": batch_size, "device": str(device)})


@torch.no_grad()
def rgb_attention_inputs(model: TANet, dataset, indices: Sequence[int],
                         device: torch.device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inputs (N, 3, 224, 224), patch colours (N, 3, 12, 12) and similarity (N, 144, 144) of some images.

    The RGB branch looks at one image at a time, so these need no batch-mates.
    """
    items = [dataset[i] for i in indices]
    if any(item is None for item in items):
        raise ReportError("an image chosen for the RGB-attention figure could not be decoded")
    x = torch.stack([item["image"] for item in items]).to(device)
    patches = model.avg_RGB(x)
    return x.cpu().numpy(), patches.cpu().numpy(), rgb_similarity(patches).cpu().numpy()
