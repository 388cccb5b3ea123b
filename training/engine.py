"""The training and evaluation loops shared by the entry scripts (one epoch, one pass)."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from imagedata.augment import augment_batch
from helpers.console import progress as progress_bar
from helpers.runtime import amp_dtype, autocast, to_device
from models import conv_fusion_available, fold_batchnorm, fuse_conv_activations, get_pretrained_cfg
from util import correlation_undefined, emd_loss, emd_loss_reference, evaluation_metrics


class NonFiniteError(FloatingPointError):
    """A NaN or infinity in the inputs, the predictions or the loss."""


# --- memory format (precision and device placement: helpers.runtime) -----------------------------

def prepare_images(images: Tensor, device: torch.device, *, train: bool, channels_last: bool) -> Tensor:
    """The model input of a batch on ``device``: float images as they are; uint8 images (from a
    cache) moved as uint8, then randomly flipped and cropped (training) and normalised there."""
    if images.dtype == torch.uint8:
        images = augment_batch(images.to(device, non_blocking=True), train=train)
    return to_device(images, device, channels_last)


# --- losses -----------------------------------------------------------------------------------

def make_criterion(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """``mse`` (tad66k), ``emd`` (NIMA per-image EMD, r=2) or ``emd_reference`` (batch-level, r=2)."""
    if name == "mse":
        return nn.MSELoss()
    if name == "emd":
        return lambda pred, target: emd_loss(pred, target, r=2)
    if name == "emd_reference":
        return emd_loss_reference
    raise ValueError(f"unknown loss {name!r}")


def default_loss(variant: str) -> str:
    """The reference's training loss of a variant (its registry entry's ``loss``)."""
    return get_pretrained_cfg(variant).loss


# --- loaders ----------------------------------------------------------------------------------

class ShardedBatches(Sampler[list[int]]):
    """Evaluation batches in file order, ``batch_size`` each; rank r takes batches r, r+W, ...

    Every batch is the one a single process would form, so batch-fused predictions do not
    depend on the number of processes, and every image is evaluated exactly once.
    """

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        self.batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)][rank::world_size]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    train: bool,
    num_workers: int,
    device: torch.device,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    collate_fn: Callable | None = None,
) -> DataLoader:
    """A training loader (shuffled by a generator seeded from seed and epoch, so a resumed
    run sees the same order) or an evaluation loader (file order, see ``ShardedBatches``)."""
    common = {
        "num_workers": num_workers,
        "pin_memory": device.type == "cuda",
        "persistent_workers": False,
        "collate_fn": collate_fn,
    }
    if num_workers > 0:
        common["prefetch_factor"] = 4
    if not train:
        return DataLoader(dataset, batch_sampler=ShardedBatches(len(dataset), batch_size, rank, world_size), **common)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if world_size > 1:
        sampler = torch.utils.data.DistributedSampler(dataset, world_size, rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, generator=generator, **common)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator, **common)


# --- one epoch of training --------------------------------------------------------------------

def _check_finite(tensor: Tensor, what: str, paths: list[str] | None, where: str) -> None:
    if torch.isfinite(tensor).all():
        return
    named = ""
    if paths is not None and tensor.ndim >= 1 and tensor.shape[0] == len(paths):
        bad = (~torch.isfinite(tensor.reshape(len(paths), -1))).any(dim=1).nonzero().flatten().tolist()
        named = f"; image(s): {', '.join(paths[i] for i in bad[:5])}"
    raise NonFiniteError(f"non-finite {what} {where}{named}")


def _check_input(raw: Tensor, images: Tensor, paths: list[str] | None, where: str) -> None:
    """Float inputs must be finite; uint8 images (the cache) are finite by construction, so they cost
    no check (on a GPU, no synchronisation)."""
    if raw.is_floating_point():
        _check_finite(images, "input", paths, where)


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    criterion: Callable[[Tensor, Tensor], Tensor],
    device: torch.device,
    *,
    epoch: int = 0,
    amp: str = "none",
    scaler: torch.amp.GradScaler | None = None,
    channels_last: bool = False,
    progress: bool = True,
    before_step: Callable[[int], None] | None = None,
) -> float:
    """One pass over ``loader`` in train mode; returns the mean loss per image.

    ``before_step(i)`` runs before the optimiser's i-th step (a learning-rate schedule)."""
    model.train()
    total, count = 0.0, 0
    bar = progress_bar(loader, desc=f"train {epoch}", unit="batch", enabled=progress)
    for step, batch in enumerate(bar):
        if batch is None:  # every image of the batch was skipped as undecodable
            continue
        where = f"in epoch {epoch}, batch {step}"
        images = prepare_images(batch["image"], device, train=True, channels_last=channels_last)
        _check_input(batch["image"], images, batch.get("path"), where)  # before the forward updates BatchNorm
        target = batch["target"].to(device, non_blocking=True).float()
        with autocast(device, amp):
            pred = model(images)
        pred = pred.float()
        loss = criterion(pred, target)
        optimizer.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        # One device synchronisation per step, before the weights change: the loss, and whether
        # the predictions are finite; the slow check only names the images.
        loss_value, finite = torch.stack([loss.detach(), torch.isfinite(pred).all().float()]).tolist()
        if not (math.isfinite(loss_value) and finite):
            _check_finite(pred, "prediction", batch.get("path"), where)
            _check_finite(loss, "loss", None, where)
        if before_step is not None:
            before_step(step)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        n = images.shape[0]
        total += loss_value * n
        count += n
        bar.set_postfix(loss=f"{total / count:.4f}")
    return total / max(count, 1)


# --- evaluation -------------------------------------------------------------------------------

def fuses_conv(fuse_conv: bool, device: torch.device, amp: str) -> bool:
    """Whether ``--fuse_conv`` takes effect: on a CPU whose oneDNN runs fused convolutions in the
    precision of ``amp`` (bfloat16 needs AVX-512)."""
    return bool(fuse_conv) and device.type == "cpu" and conv_fusion_available(amp_dtype(amp))


def evaluation_model(model: nn.Module, device: torch.device, *, fold_bn: bool = False, fuse_conv: bool = False,
                     amp: str = "none", channels_last: bool = False) -> nn.Module:
    """The model as evaluation runs it. With ``fold_bn``, an inference copy with every BatchNorm folded
    into its convolution (of a compiled model, an eager copy), whose convolutions also run fused with
    their activations when ``fuses_conv`` says so; else the model itself."""
    if not fold_bn:
        return model
    copy = fold_batchnorm(getattr(model, "_orig_mod", model))
    if fuses_conv(fuse_conv, device, amp):
        copy = fuse_conv_activations(copy, amp_dtype(amp), copy_model=False)  # already a copy
    return copy.to(memory_format=torch.channels_last) if channels_last else copy


@dataclass
class Predictions:
    """Everything one evaluation pass produced, in dataset order."""

    index: list[int] = field(default_factory=list)
    path: list[str] = field(default_factory=list)
    theme: list[str] = field(default_factory=list)
    output: list[np.ndarray] = field(default_factory=list)  # model outputs, (k,) per image
    target: list[np.ndarray] = field(default_factory=list)
    loss_sum: float = 0.0

    def merge(self, others: list["Predictions"]) -> "Predictions":
        """All ranks' predictions together, sorted by dataset index."""
        rows = sorted(
            (i, p, t, o, g) for part in others
            for i, p, t, o, g in zip(part.index, part.path, part.theme, part.output, part.target)
        )
        merged = Predictions(loss_sum=sum(part.loss_sum for part in others))
        for i, p, t, o, g in rows:
            merged.index.append(i), merged.path.append(p), merged.theme.append(t)
            merged.output.append(o), merged.target.append(g)
        return merged

    def scores(self, variant: str) -> tuple[np.ndarray, np.ndarray]:
        """Predicted and true scores on the scale the metrics use: 0..1 (tad66k) or 1..10 (ava)."""
        cfg = get_pretrained_cfg(variant)
        return cfg.metric_scores(np.stack(self.output)), cfg.metric_scores(np.stack(self.target))

    def scores_1_to_10(self, variant: str) -> tuple[np.ndarray, np.ndarray]:
        """Predicted and true scores on 1..10."""
        cfg = get_pretrained_cfg(variant)
        return cfg.scores_1_to_10(np.stack(self.output)), cfg.scores_1_to_10(np.stack(self.target))

    def metrics(self, variant: str, per_theme: bool = True) -> dict:
        """SRCC, PLCC, accuracy, MSE (0..1 scale for tad66k), EMD (ava), loss, and per theme when asked."""
        cfg = get_pretrained_cfg(variant)
        pred, true = self.scores(variant)
        dists = {}
        if cfg.is_distribution:
            dists = {"pred_dist": np.stack(self.output), "true_dist": np.stack(self.target)}
        themes = self.theme if per_theme and any(self.theme) else None
        result = evaluation_metrics(pred, true, threshold=cfg.accuracy_threshold, themes=themes, **dists)
        result["loss"] = self.loss_sum / max(len(self.index), 1)
        reason = correlation_undefined(pred, true)
        if reason:  # why SRCC and PLCC are NaN
            result["undefined"] = {"srcc": reason, "plcc": reason}
        return result


@torch.no_grad()
def infer(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    *,
    criterion: Callable[[Tensor, Tensor], Tensor] | None = None,
    amp: str = "none",
    channels_last: bool = False,
    progress: bool = True,
    desc: str = "eval",
) -> Predictions:
    """Run ``model`` in eval mode over ``loader`` and collect outputs, targets and the loss."""
    model.eval()
    result = Predictions()
    for batch in progress_bar(loader, desc=desc, unit="batch", enabled=progress):
        if batch is None:
            continue
        images = prepare_images(batch["image"], device, train=False, channels_last=channels_last)
        _check_input(batch["image"], images, batch["path"], f"in {desc}")
        with autocast(device, amp):
            out = model(images)
        out = out.float()
        _check_finite(out, "prediction", batch["path"], f"in {desc}")
        target = batch["target"].to(device).float()
        if criterion is not None:
            result.loss_sum += float(criterion(out, target)) * images.shape[0]
        result.index += [int(i) for i in batch["index"]]
        result.path += list(batch["path"])
        result.theme += list(batch["theme"])
        result.output += list(out.cpu().numpy())
        result.target += list(target.cpu().numpy())
    return result


def gather_predictions(part: Predictions, world_size: int) -> Predictions:
    """Every rank's predictions on every rank (a plain merge for one process)."""
    if world_size == 1:
        return part.merge([part])
    parts: list[Predictions | None] = [None] * world_size
    dist.all_gather_object(parts, part)
    return part.merge([p for p in parts if p is not None])


def is_better(value: float, best: float | None) -> bool:
    """Higher is better; NaN never wins."""
    return not math.isnan(value) and (best is None or value > best)
