"""Personalized aesthetics (the paper's Table 4) by the protocol of Ren et al. (ICCV 2017) on FLICKR-AES:
for each test worker, k of its images (k = 10, 100) fine-tune a copy of the generic TANet; the copy
predicts the worker's other images; SRCC against the worker's own ratings. R seeded draws of the k images;
per draw the mean SRCC over the workers, then the mean and standard deviation over the draws, and the
generic model's SRCC on the same images before fine-tuning.

Fine-tuning (``Recipe``) trains the heads only: the aesthetics head (L5's Linear 1280 -> 10) and the fusion
head (L6), or L6 alone. What feeds them is frozen, so it is computed once per image (``extract_features``):
the MobileNetV2 trunk's pooled features, the RGB-attention output and the theme feature. The theme feature
comes from batch fusion as the model was trained and as the reference evaluates: every test-worker image
(sorted by name) in batches of ``eval_batch_size``, once, so an image's theme feature is the same in every
draw and for every worker who rated it, whichever images are drawn for fine-tuning.

Results are recorded per worker as each finishes (``ResultStore``), so a killed run resumes with the
workers not yet done and ends with the table of an uninterrupted run.
"""
from __future__ import annotations

import copy
import csv
import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from helpers.console import progress as progress_bar
from dataset import collate_skip_none
from helpers.runtime import autocast
from training.engine import evaluation_model, make_loader, prepare_images
from imagedata.flickr_aes import RatedImageDataset, WorkerSplit, to_1_10
from helpers.safe_io import atomic_save_json, atomic_torch_save, atomic_write, csv_text_cell, json_text, safe_torch_load
from util import srcc

FINETUNE_PARTS = {"heads": ("aesthetics", "fusion"), "fusion": ("fusion",)}
RUN_FILE = "run.json"
FEATURES_FILE = "features.pt"
WORKERS_DIR = "workers"
RESULTS_JSON = "personalized.json"
RESULTS_MD = "personalized.md"
RESULTS_CSV = "personalized_workers.csv"
OUTPUTS = (RUN_FILE, FEATURES_FILE, WORKERS_DIR, RESULTS_JSON, RESULTS_MD, RESULTS_CSV)


class ProtocolError(ValueError):
    """A run folder or a setting the protocol cannot use (the message says which and what to do)."""


@dataclass(frozen=True)
class Recipe:
    """How a copy of the generic model is fine-tuned on a worker's k images: Adam on the MSE of the
    score / 10 (as the generic model trains), ``epochs`` passes over the k images in shuffled batches of
    ``batch_size`` (0: all k at once), dropout on or off."""

    parts: str = "heads"
    lr: float = 1e-3
    epochs: int = 100
    batch_size: int = 0
    weight_decay: float = 0.0
    dropout: bool = False

    def __post_init__(self) -> None:
        if self.parts not in FINETUNE_PARTS:
            raise ValueError(f"--finetune must be one of {', '.join(FINETUNE_PARTS)}, got {self.parts!r}")
        if (not (self.lr >= 0 and math.isfinite(self.lr))
                or not (self.weight_decay >= 0 and math.isfinite(self.weight_decay))):
            raise ValueError(f"--ft_lr and --ft_weight_decay must be finite and >= 0, "
                             f"got {self.lr}, {self.weight_decay}")
        if self.epochs < 0 or self.batch_size < 0:
            raise ValueError(f"--ft_epochs and --ft_batch_size must be >= 0, got {self.epochs}, {self.batch_size}")


@dataclass(frozen=True)
class Protocol:
    """Shots k, repeats R, the seed of the draws, and the fewest images a worker must have left to predict
    after its k (workers with fewer are left out of that k's row, and the JSON says so)."""

    shots: tuple[int, ...] = (10, 100)
    repeats: int = 10
    seed: int = 0
    min_test_images: int = 10
    recipe: Recipe = field(default_factory=Recipe)

    def __post_init__(self) -> None:
        if not self.shots or any(k < 1 for k in self.shots) or len(set(self.shots)) != len(self.shots):
            raise ValueError(f"--shots must be distinct positive numbers of images, got {list(self.shots)}")
        if self.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {self.repeats}")
        if self.min_test_images < 2:
            raise ValueError(f"--min_test_images must be >= 2 (an SRCC needs two images), got {self.min_test_images}")
        if isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"--seed must be a non-negative integer, got {self.seed!r}")


# --------------------------------------------------------------------------- frozen features

@dataclass
class Features:
    """What the frozen parts give for each image (rows in ``names`` order): the MobileNetV2 trunk's pooled
    features (N, 1280), the theme feature (N, 10) and the RGB-attention output (N, 10)."""

    names: list[str]
    trunk: Tensor
    theme: Tensor
    rgb: Tensor

    def rows(self, names: Sequence[str]) -> np.ndarray:
        index = {name: i for i, name in enumerate(self.names)}
        return np.array([index[name] for name in names], dtype=np.int64)


@torch.no_grad()
def extract_features(model: nn.Module, dataset: RatedImageDataset, *, device: torch.device, batch_size: int,
                     num_workers: int = 0, fold_bn: bool = False, fuse_conv: bool = False, amp: str = "none",
                     channels_last: bool = False, progress: bool = True) -> Features:
    """The frozen parts' outputs for every image of ``dataset``, in its order, evaluated as the model's
    evaluation runs it (batches of ``batch_size`` in file order; ``engine.evaluation_model``)."""
    net = evaluation_model(model, device, fold_bn=fold_bn, fuse_conv=fuse_conv, amp=amp, channels_last=channels_last)
    net.eval()
    loader = make_loader(dataset, batch_size=batch_size, train=False, num_workers=num_workers, device=device,
                         collate_fn=collate_skip_none)
    captured: list[Tensor] = []
    hook = net.mobileNet.base_model.register_forward_hook(lambda _m, _i, out: captured.append(out.flatten(1)))
    names, trunk, theme, rgb = [], [], [], []
    try:
        for batch in progress_bar(loader, desc="features", unit="batch", enabled=progress):
            images = prepare_images(batch["image"], device, train=False, channels_last=channels_last)
            captured.clear()
            with autocast(device, amp):
                out = net.forward_branches(images)
            names += [dataset.names[int(i)] for i in batch["index"]]
            trunk.append(captured[0].float().cpu())
            theme.append(out["x_theme"].float().cpu())
            rgb.append(out["x_rgb"].float().cpu())
    finally:
        hook.remove()
    return Features(names, torch.cat(trunk), torch.cat(theme), torch.cat(rgb))


# --------------------------------------------------------------------------- the heads

class Heads(nn.Module):
    """Copies of a TANet's aesthetics head (``mobileNet.head``) and fusion head (``head``): on frozen
    features they give what the model gives (its output in 0..1, the score / 10)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.aesthetics = copy.deepcopy(model.mobileNet.head).float().cpu()
        self.fusion = copy.deepcopy(model.head).float().cpu()

    def forward(self, trunk: Tensor, theme: Tensor, rgb: Tensor) -> Tensor:
        return self.fusion(torch.cat([self.aesthetics(trunk), theme, rgb], dim=1))[:, 0]


@torch.no_grad()
def predict(heads: Heads, features: Features, rows: np.ndarray) -> np.ndarray:
    heads.eval()
    idx = torch.from_numpy(rows)
    return heads(features.trunk[idx], features.theme[idx], features.rgb[idx]).double().numpy()


def finetune(generic: Heads, features: Features, rows: np.ndarray, targets: np.ndarray, recipe: Recipe,
             seed: int) -> Heads:
    """A copy of ``generic`` fine-tuned by ``recipe`` on the images ``rows`` with ``targets`` (score / 10);
    deterministic for the same seed (batch order and dropout draw from it, not from the global RNG)."""
    heads = copy.deepcopy(generic)
    trainable = [p for name in FINETUNE_PARTS[recipe.parts] for p in getattr(heads, name).parameters()]
    heads.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(trainable, lr=recipe.lr, weight_decay=recipe.weight_decay)
    idx = torch.from_numpy(rows)
    trunk, theme, rgb = features.trunk[idx], features.theme[idx], features.rgb[idx]
    target = torch.as_tensor(targets, dtype=torch.float32)
    size = recipe.batch_size or len(rows)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        order = torch.Generator().manual_seed(seed)
        heads.train(recipe.dropout)
        for _ in range(recipe.epochs):
            perm = torch.randperm(len(rows), generator=order)
            for start in range(0, len(rows), size):
                b = perm[start:start + size]
                loss = nn.functional.mse_loss(heads(trunk[b], theme[b], rgb[b]), target[b])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    heads.eval()
    return heads


# --------------------------------------------------------------------------- one worker

def draw_seed(seed: int, worker: str, shots: int, repeat: int) -> np.random.SeedSequence:
    """The seed of one draw: the same for a worker, k and repeat in every run, whatever the order of work."""
    key = int.from_bytes(hashlib.sha256(worker.encode("utf-8")).digest()[:8], "little")
    return np.random.SeedSequence([seed, shots, repeat, key])


def _srcc(pred: np.ndarray, true: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # undefined (constant ratings): NaN, counted in the summary
        return srcc(pred, true)


def evaluate_worker(worker: str, table: pd.DataFrame, features: Features, generic: Heads,
                    protocol: Protocol) -> dict[str, Any]:
    """Every draw of one worker: for each k and repeat the generic and fine-tuned SRCC on the images not
    drawn. ``table``: the worker's images and ratings (1..5). A k that leaves fewer than
    ``min_test_images`` images is skipped, with the reason."""
    rows = features.rows(table["image"].tolist())
    ratings = table["score"].to_numpy(dtype=np.float64)
    targets = to_1_10(ratings) / 10.0
    generic_pred = predict(generic, features, rows)
    n = len(rows)
    result: dict[str, Any] = {"worker": worker, "n_images": n, "shots": {}}
    for k in protocol.shots:
        if n < k + protocol.min_test_images:
            result["shots"][str(k)] = {"skipped": f"{n} images: fewer than {k} to fine-tune on and "
                                                  f"{protocol.min_test_images} to predict"}
            continue
        draws = []
        for r in range(protocol.repeats):
            seeds = draw_seed(protocol.seed, worker, k, r)
            chosen = np.sort(np.random.default_rng(seeds).choice(n, size=k, replace=False))
            rest = np.setdiff1d(np.arange(n), chosen)
            tuned = finetune(generic, features, rows[chosen], targets[chosen], protocol.recipe,
                             int(seeds.generate_state(1)[0]))
            draws.append({"repeat": r, "n_train": k, "n_test": int(rest.size),
                          "generic_srcc": _srcc(generic_pred[rest], ratings[rest]),
                          "finetuned_srcc": _srcc(predict(tuned, features, rows[rest]), ratings[rest])})
        result["shots"][str(k)] = {"draws": draws}
    return result


# --------------------------------------------------------------------------- the run folder

def _json_text(value: Any) -> str:
    return json_text(value, sort_keys=True)


def images_record(folder: str | os.PathLike, names: Sequence[str]) -> dict[str, Any]:
    """What the frozen features are computed from, for ``run.json``: the images' folder (absolute) and
    a digest of every image's name, size and modification time (a missing one counts as size -1)."""
    folder = Path(folder).resolve()
    h = hashlib.sha256()
    for name in sorted(names):
        try:
            st = (folder / name).stat()
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime = -1, 0
        h.update(f"{name}\0{size}\0{mtime}\n".encode("utf-8", "surrogateescape"))
    return {"folder": str(folder), "count": len(names), "sizes_and_mtimes_sha256": h.hexdigest()}


def _other_images(out: Path, old: Any, new: Any) -> str:
    """The one-line refusal of a run folder whose features came from other images."""
    old, new = (v if isinstance(v, dict) else {} for v in (old, new))
    if old.get("folder") != new.get("folder"):
        what = f"from {old.get('folder', 'an unrecorded folder')}, not {new.get('folder')}"
    elif old.get("count") != new.get("count"):
        what = f"from {old.get('count')} images, not {new.get('count')}"
    else:
        what = f"whose sizes or modification times have changed since (in {new.get('folder')})"
    return (f"--out {out} holds a run whose features were computed from other images ({what}); its table would "
            f"be stale: start fresh with another --out (or delete {RUN_FILE}, {FEATURES_FILE} and {WORKERS_DIR}/ "
            f"in it)")


class ResultStore:
    """A run folder: ``run.json`` (the settings), ``workers/<digest>.json`` (one per finished worker,
    written atomically as it finishes) and ``features.pt`` (the frozen features). A folder that holds
    another run's settings, or outputs of ours without ``run.json``, is refused, never overwritten."""

    def __init__(self, out: str | os.PathLike, settings: Mapping[str, Any]) -> None:
        self.out = Path(out)
        self.settings = json.loads(_json_text(settings))

    def open(self) -> "ResultStore":
        run = self.out / RUN_FILE
        if run.exists():
            try:
                old = json.loads(run.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                raise ProtocolError(f"{run} is not a run file of this protocol; choose another --out") from None
            if old != self.settings:
                changed = sorted(k for k in set(old) | set(self.settings) if old.get(k) != self.settings.get(k))
                if "images" in changed:
                    raise ProtocolError(_other_images(self.out, old.get("images"), self.settings.get("images")))
                raise ProtocolError(f"--out {self.out} holds a run with other settings ({', '.join(changed)} differ): "
                                    f"rerun it with the same options to resume it, or choose another --out")
        else:
            held = [name for name in OUTPUTS if (self.out / name).exists()]
            if held:
                raise ProtocolError(f"--out {self.out} holds {', '.join(held)} but no {RUN_FILE}, so not a run of "
                                    f"this protocol; they are never overwritten: choose another --out")
            atomic_save_json(self.settings, run)
        return self

    def _path(self, worker: str) -> Path:
        return self.out / WORKERS_DIR / f"{hashlib.sha256(worker.encode('utf-8')).hexdigest()[:20]}.json"

    def done(self, worker: str) -> dict[str, Any] | None:
        """The recorded result of ``worker``, or None when it is not finished."""
        try:
            record = json.loads(self._path(worker).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ProtocolError(f"{self._path(worker)} cannot be read ({exc}); delete it to redo worker "
                                f"{worker!r}") from None
        if not (isinstance(record, dict) and record.get("worker") == worker):
            return None
        for entry in record.get("shots", {}).values():  # strict JSON holds an undefined SRCC as null
            for draw in entry.get("draws", []):
                for key in ("generic_srcc", "finetuned_srcc"):
                    draw[key] = math.nan if draw.get(key) is None else draw[key]
        return record

    def record(self, result: Mapping[str, Any]) -> None:
        atomic_save_json(dict(result), self._path(result["worker"]))

    def features(self, compute: Callable[[], Features]) -> Features:
        """The frozen features of this run: read from ``features.pt``, else computed and saved there."""
        path = self.out / FEATURES_FILE
        if path.is_file():
            saved = safe_torch_load(path)
            return Features(list(saved["names"]), saved["trunk"], saved["theme"], saved["rgb"])
        features = compute()
        atomic_torch_save({"names": features.names, "trunk": features.trunk, "theme": features.theme,
                           "rgb": features.rgb}, path)
        return features


def run_protocol(split: WorkerSplit, features: Features, generic: Heads, protocol: Protocol, store: ResultStore,
                 *, progress: bool = True) -> list[dict[str, Any]]:
    """Every test worker's draws (``evaluate_worker``), in the split's order; workers already recorded
    in ``store`` are read back, the others computed and recorded as each finishes."""
    results: dict[str, dict[str, Any]] = {}
    todo = []
    for worker in split.test_workers:
        record = store.done(worker)
        if record is None:
            todo.append(worker)
        else:
            results[worker] = record
    with progress_bar(desc="workers", total=len(split.test_workers), initial=len(results), unit="worker",
                      enabled=progress) as bar:
        for worker in todo:
            results[worker] = evaluate_worker(worker, split.personal[worker], features, generic, protocol)
            store.record(results[worker])
            bar.update(1)
    return [results[w] for w in split.test_workers]


# --------------------------------------------------------------------------- the table

def _mean_std(values: Sequence[float]) -> dict[str, Any]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std()), "per_repeat": [float(v) for v in a]}


def summarize(records: Sequence[Mapping[str, Any]], protocol: Protocol) -> dict[str, Any]:
    """Per k: for each repeat the mean SRCC over the workers (generic, fine-tuned, and their difference),
    then their mean and standard deviation (numpy's, over the R repeats). A worker whose SRCC is undefined
    in a draw (all its predicted images rated alike) is left out of that draw's mean and counted; ``workers``
    counts those in at least one draw's mean, ``undefined_workers`` lists the others."""
    table: dict[str, Any] = {}
    for k in map(str, protocol.shots):
        used = [rec for rec in records if "draws" in rec["shots"][k]]
        skipped = [rec["worker"] for rec in records if "draws" not in rec["shots"][k]]
        if not used:
            table[k] = {"workers": 0, "skipped_workers": skipped}
            continue
        columns: dict[str, list[float]] = {"generic": [], "finetuned": [], "gain": []}
        undefined = 0
        counted: set[str] = set()
        for r in range(protocol.repeats):
            pairs = [(rec["worker"], rec["shots"][k]["draws"][r]["generic_srcc"],
                      rec["shots"][k]["draws"][r]["finetuned_srcc"]) for rec in used]
            ok = [(w, g, f) for w, g, f in pairs if math.isfinite(g) and math.isfinite(f)]
            undefined += len(pairs) - len(ok)
            counted.update(w for w, _, _ in ok)
            g, f = (np.array([p[i] for p in ok]) for i in (1, 2))
            columns["generic"].append(float(g.mean()) if ok else math.nan)
            columns["finetuned"].append(float(f.mean()) if ok else math.nan)
            columns["gain"].append(float((f - g).mean()) if ok else math.nan)
        table[k] = {"workers": len(counted), "skipped_workers": skipped, "undefined_srcc_draws": undefined,
                    "undefined_workers": [rec["worker"] for rec in used if rec["worker"] not in counted],
                    **{name: _mean_std(values) for name, values in columns.items()}}
    return table


def _cell(stats: Mapping[str, Any] | None, signed: bool = False) -> str:
    if stats is None:
        return "n/a"
    return f"{stats['mean']:{'+' if signed else ''}.3f} ± {stats['std']:.3f}"


def _workers_cell(row: Mapping[str, Any]) -> str:
    """The workers in the means, and of how many when some had an undefined SRCC in every draw."""
    left_out = len(row.get("undefined_workers") or [])
    return f"{row['workers']} of {row['workers'] + left_out}" if left_out else str(row["workers"])


def markdown_table(table: Mapping[str, Any], protocol: Protocol, about: Mapping[str, Any]) -> str:
    """The table in the paper's layout (one column per k, mean ± std over the repeats), with what it is."""
    ks = [str(k) for k in protocol.shots]
    head = "| model | " + " | ".join(f"{k} images" for k in ks) + " |\n|---|" + "---|" * len(ks) + "\n"
    lines = [("TANet, generic (before fine-tuning)", "generic", False),
             ("TANet, fine-tuned per worker", "finetuned", False), ("gain", "gain", True)]
    body = "".join("| " + label + " | " + " | ".join(_cell(table[k].get(key), signed) for k in ks) + " |\n"
                   for label, key, signed in lines)
    body += "| test workers | " + " | ".join(_workers_cell(table[k]) for k in ks) + " |\n"
    for k in ks:
        left_out = table[k].get("undefined_workers") or []
        if left_out:
            body += (f"\nk = {k}: {len(left_out)} test workers ({', '.join(left_out)}) had an undefined SRCC in every "
                     f"draw (all their predicted images rated alike) and are in no mean.\n")
    r = protocol.recipe
    return (f"# Personalized aesthetics on {about['data']} (the paper's Table 4)\n\n"
            f"SRCC between each test worker's own ratings and the predictions on the worker's images that were "
            f"not drawn for fine-tuning, averaged over the test workers; mean ± standard deviation over "
            f"{protocol.repeats} seeded draws (seed {protocol.seed}) of the k images.\n\n{head}{body}\n"
            f"Generic model: {about['generic']}. Fine-tuning: {' and '.join(FINETUNE_PARTS[r.parts])} head(s), "
            f"Adam lr {r.lr:g}, {r.epochs} epochs, batch {'all k' if not r.batch_size else r.batch_size}, weight "
            f"decay {r.weight_decay:g}, dropout {'on' if r.dropout else 'off'}; the frozen parts' outputs computed "
            f"once per image, theme feature from batch fusion over the test images in name order (batches of "
            f"{about['eval_batch_size']}).\n")


def write_outputs(out: str | os.PathLike, records: Sequence[Mapping[str, Any]], protocol: Protocol,
                  about: Mapping[str, Any]) -> dict[str, Any]:
    """``personalized.json`` (table, per-repeat means, protocol, recipe, data), ``personalized.md`` and
    ``personalized_workers.csv`` (one row per worker, k and repeat; worker ids safe in a spreadsheet,
    ``safe_io.csv_text_cell``), each written atomically."""
    out = Path(out)
    table = summarize(records, protocol)
    result = {"table": table, "protocol": {**asdict(protocol), "shots": list(protocol.shots)}, **about}
    atomic_save_json(result, out / RESULTS_JSON)
    with atomic_write(out / RESULTS_MD, "w") as f:
        f.write(markdown_table(table, protocol, about))
    with atomic_write(out / RESULTS_CSV, "w") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["worker", "n_images", "shots", "repeat", "n_train", "n_test", "generic_srcc",
                         "finetuned_srcc"])
        for rec in records:
            for k, entry in rec["shots"].items():
                for d in entry.get("draws", []):
                    writer.writerow([csv_text_cell(str(rec["worker"])), rec["n_images"], k, d["repeat"],
                                     d["n_train"], d["n_test"], repr(d["generic_srcc"]), repr(d["finetuned_srcc"])])
    return result
