"""The analysis report of a trained TANet, as a library: ``write_report`` (a finished run folder) and
``write_split_report`` (a checkpoint on a test split) write the PNG figures, one self-contained HTML page
and the same figures in TensorBoard.
"""
from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dataset import load_image
from models import TANet, get_pretrained_cfg, load_tanet
from training.run_data import build_run_datasets
from helpers.runtime import precision_name, resolve_device
from helpers.safe_io import atomic_save_json, atomic_write
from util import plcc, srcc

from . import figures
from .report_error import ReportError
from .figures import ScoredImage, ThemeRow
from .page import markdown_table, render_html
from .passes import ModelPass, evaluation_settings, model_pass, rgb_attention_inputs
from .predictions import PREDICTIONS_CSV, read_predictions
from .stats import ScoreTable, hidden_counts, quiet_correlation, spread, theme_rows

RESULTS_JSON = "results.json"
HTML_NAME = "report.html"
FIGURE_DIR = "report"  # the PNGs and report_data.json, beside report.html
DATA_JSON = "report_data.json"
RUN_CHECKPOINTS = ("best.pth", "last.pth")
N_ATTENTION = 3  # images of the RGB-attention figure, spread over the true score
N_DISTRIBUTIONS = 6  # images of the ava distribution figure
N_THUMBNAILS = 5  # best and worst images each
THUMBNAIL_PX = 192
RERUN_TOLERANCE = 1e-5  # on 1..10: the same path on the same machine gives the same scores


@dataclass
class Report:
    """What ``write_report`` wrote and the numbers behind the model-pass figures."""

    html: Path
    figures: dict[str, Path]  # figure name -> PNG
    data: Path  # report_data.json
    n_images: int  # images of the predictions (scatter, per theme, thumbnails)
    n_model_images: int  # images of the model pass (hidden nodes, distributions)
    hidden_most_positive: np.ndarray  # (100,) images whose most positive theme hidden node is i
    hidden_most_negative: np.ndarray
    rerun_max_difference: float | None  # max |pass - test_predictions.csv| on 1..10, when comparable
    notes: list[str] = field(default_factory=list)


# --- inputs -----------------------------------------------------------------------------------

def read_results(path: Path) -> dict:
    """``results.json`` if the run has one, else {}."""
    if not path.is_file():
        return {}
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path} is not readable JSON: {exc}") from None
    if not isinstance(results, dict):
        raise ReportError(f"{path} does not hold a JSON object")
    return results


def run_checkpoint(run_dir: Path, results: Mapping) -> Path:
    """The checkpoint the run's test predictions came from: results.json's, else best.pth, else last.pth."""
    candidates = []
    if results.get("checkpoint"):
        candidates.append(run_dir / Path(str(results["checkpoint"])).name)
    candidates += [run_dir / name for name in RUN_CHECKPOINTS]
    for path in candidates:
        if path.is_file():
            return path
    raise ReportError(f"no checkpoint in {run_dir} ({' or '.join(RUN_CHECKPOINTS)} not found); "
                      f"pass --checkpoint PATH")


def merge_options(saved: Mapping | None, overrides: Mapping | None) -> dict:
    """The run's options (from its checkpoint), with the explicitly given ones (not None) on top."""
    opts = dict(saved or {})
    opts.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return opts


def load_test_split(opts: Mapping, variant: str):
    """The run's test split as training built it (its --max_images, --skip_missing, --skip_bad included)."""
    return build_run_datasets({**opts, "variant": variant}, splits=("test",), validation="test",
                              use_cache=False)["test"]


# --- the report -------------------------------------------------------------------------------

def _device(device: str | torch.device) -> torch.device:
    return device if isinstance(device, torch.device) else resolve_device(str(device))


def _thumbnail(path: str) -> np.ndarray:
    img = load_image(path)
    img.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    return np.asarray(img)


def _png_rgb(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as img:
        return np.asarray(img.convert("RGB"))


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


@dataclass
class _Inputs:
    """What the figures are made from."""

    model: TANet
    dataset: Any  # the test split (dataset.ImageTableDataset)
    preds: ScoreTable
    row_index: list[int]  # dataset index of every row of preds
    run_pass: ModelPass
    batch_size: int
    rerun_diff: float | None
    notes: list[str]


def _attention_rows(names: Sequence[str] | None, preds: ScoreTable) -> list[int]:
    if not names:
        return spread(preds.true, N_ATTENTION)
    rows = {n: i for i, n in enumerate(preds.names)}
    missing = [n for n in names if Path(n).name not in rows]
    if missing:
        raise ReportError(f"attention image {missing[0]!r} is not among the {len(preds.names)} scored images "
                          f"of the test split")
    return [rows[Path(n).name] for n in names]


def _differences(results: Mapping, checkpoint: Path, run_pass: ModelPass) -> list[str]:
    """How the model pass is computed otherwise than the run's test (as far as results.json records it)."""
    said = []
    if results.get("checkpoint") and Path(str(results["checkpoint"])).name != checkpoint.name:
        said.append(f"the run tested {Path(str(results['checkpoint'])).name}, the pass uses {checkpoint.name}")
    recorded = {**results.get("evaluation", {}), "theme_fusion": results.get("theme_fusion"),
                "batch_size": results.get("eval_batch_size")}
    for key, value in recorded.items():
        if value is not None and key in run_pass.path and value != run_pass.path[key]:
            said.append(f"{key} {value!r} in the run, {run_pass.path[key]!r} in the pass")
    return said


def _check_rerun(preds: ScoreTable, names: Sequence[str], run_pass: ModelPass, variant: str, results: Mapping,
                 checkpoint: Path, notes: list[str]) -> float:
    """Max |model pass - test_predictions.csv| over the images of both; a note saying what differs when
    it is more than rounding."""
    csv_pred = dict(zip(preds.names, preds.pred))
    diff = max((abs(csv_pred[n] - p) for n, p in zip(names, run_pass.pred(variant)) if n in csv_pred), default=0.0)
    if diff > RERUN_TOLERANCE:
        what = _differences(results, checkpoint, run_pass)
        cause = "; ".join(what) if what else ("with the same checkpoint, batch size, device and evaluation path: "
                                              "another machine or library version computes it")
        notes.append(f"The model pass differs from {PREDICTIONS_CSV} by up to {diff:.2g} on 1..10 ({cause})")
    return float(diff)


def _gather(*, checkpoint: Path, preds_csv: Path | None, results: Mapping, options: Mapping | None,
            max_images: int | None, device: torch.device, num_workers: int,
            attention_images: Sequence[str] | None, allow_unsafe: bool, progress: bool,
            complete_options: Callable[[Mapping], dict] | None = None) -> tuple[_Inputs, list[int]]:
    """Load the checkpoint and the split, read (or make) the predictions, run the model pass."""
    if not checkpoint.is_file():
        raise ReportError(f"checkpoint {checkpoint} not found")
    given = {k: v for k, v in (options or {}).items() if v is not None}
    model, meta = load_tanet(checkpoint, variant=given.get("variant") or results.get("variant"),
                             allow_unsafe=allow_unsafe, model_class=TANet)
    model = model.to(device).eval()
    opts = merge_options(meta.get("options"), given)
    if not opts.get("dataset"):
        raise ReportError(f"{checkpoint} holds no run options: pass --dataset (and --path_to_images, "
                          f"--path_to_save_csv as for training)")
    opts = {**opts, "variant": model.variant}
    if complete_options is not None:
        opts = complete_options(opts)
    batch_size = int(opts["eval_batch_size"])
    dataset = load_test_split(opts, model.variant)
    by_name: dict[str, int] = {}
    for i, name in enumerate(dataset.names):
        by_name.setdefault(Path(name).name, i)
    notes: list[str] = []

    csv = None
    if preds_csv is not None:  # check the run's files before the (slow) model pass
        csv = read_predictions(preds_csv)
        unknown = [n for n in csv.names if n not in by_name]
        if unknown:
            raise ReportError(f"{preds_csv}: image {unknown[0]!r} is not in the test split built from the run's "
                              f"options ({dataset.source}); pass the run's data options")
        attention = _attention_rows(attention_images, csv)
    elif attention_images:  # scored by the pass: the first max_images images
        first = ScoreTable([Path(n).name for n in dataset.names[:max_images]], [], np.zeros(0), np.zeros(0))
        _attention_rows(attention_images, first)

    run_pass = model_pass(model, dataset, batch_size=batch_size, limit=max_images, device=device,
                          num_workers=num_workers, progress=progress, settings=evaluation_settings(opts, device))
    pass_names = [Path(dataset.names[i]).name for i in run_pass.index]
    rerun_diff = None
    if csv is not None:
        rerun_diff = _check_rerun(csv, pass_names, run_pass, model.variant, results, checkpoint, notes)
    else:
        csv = ScoreTable(pass_names, [dataset.themes[i] for i in run_pass.index],
                         dataset.scores[run_pass.index].astype(float), run_pass.pred(model.variant).astype(float))
        attention = _attention_rows(attention_images, csv)
    inputs = _Inputs(model, dataset, csv, [by_name[n] for n in csv.names], run_pass, batch_size, rerun_diff, notes)
    return inputs, attention


def _figures(inp: _Inputs, attention: Sequence[int], device: torch.device) -> tuple[dict[str, bytes], dict]:
    """Every figure as PNG bytes (in report order) and the numbers behind them."""
    preds, dataset, run_pass, variant = inp.preds, inp.dataset, inp.run_pass, inp.model.variant
    pngs: dict[str, bytes] = {}
    rows = theme_rows(preds)
    s, c = quiet_correlation(srcc, preds.pred, preds.true), quiet_correlation(plcc, preds.pred, preds.true)
    if rows:
        pngs["per_theme_metrics"] = figures.png_bytes(figures.per_theme_metrics_figure(rows))
        pngs["per_theme_means"] = figures.png_bytes(figures.per_theme_means_figure(rows))
    else:
        inp.notes.append("The split has no themes: no per-theme figures.")
    pngs["scatter"] = figures.png_bytes(figures.score_scatter_figure(preds.true, preds.pred, s, c))
    pngs["histograms"] = figures.png_bytes(figures.score_histograms_figure(preds.true, preds.pred))

    if get_pretrained_cfg(variant).is_distribution:  # the distributions come from the pass (batch-fused outputs)
        picks = spread(dataset.scores[run_pass.index], N_DISTRIBUTIONS)
        idx = [run_pass.index[p] for p in picks]
        pass_pred = run_pass.pred(variant)
        items = [ScoredImage(Path(dataset.names[i]).name, float(dataset.scores[i]), float(pass_pred[p]))
                 for i, p in zip(idx, picks)]
        pngs["distributions"] = figures.png_bytes(
            figures.distributions_figure(items, dataset.targets[idx], run_pass.output[picks]))

    def scored(row: int) -> ScoredImage:
        return ScoredImage(preds.names[row], float(preds.true[row]), float(preds.pred[row]))

    if "rgb" in inp.model.branches:
        x, patches, similarity = rgb_attention_inputs(inp.model, dataset, [inp.row_index[r] for r in attention],
                                                      device)
        pngs["rgb_attention"] = figures.png_bytes(
            figures.rgb_attention_figure([scored(r) for r in attention], x, patches, similarity))
    else:
        inp.notes.append("The model has no RGB-attention branch: no RGB-attention figure.")

    most_pos = most_neg = np.zeros(0, dtype=int)
    if run_pass.hidden is not None:
        most_pos, most_neg = hidden_counts(run_pass.hidden)
        pngs["hidden_nodes"] = figures.png_bytes(figures.hidden_nodes_figure(most_pos, most_neg, len(run_pass.index)))
    else:
        inp.notes.append("The model has no theme branch: no theme hidden-node figure.")

    order = [int(r) for r in np.argsort(-preds.pred, kind="stable")]
    k = max(1, min(N_THUMBNAILS, len(order) // 2))
    best, worst = order[:k], order[::-1][:k]
    pngs["best_worst"] = figures.png_bytes(figures.best_worst_figure(
        [(scored(r), _thumbnail(dataset.paths[inp.row_index[r]])) for r in best],
        [(scored(r), _thumbnail(dataset.paths[inp.row_index[r]])) for r in worst]))

    data = {
        "variant": variant, "n_images": len(preds.names), "srcc": s, "plcc": c,
        "per_theme": [vars(r) for r in rows],
        "model_pass": {"n_images": len(run_pass.index), "batch_size": inp.batch_size,
                       "hidden_most_positive": most_pos.tolist(), "hidden_most_negative": most_neg.tolist()},
        "branches": list(inp.model.branches),
        "rgb_attention_images": [preds.names[r] for r in attention] if "rgb" in inp.model.branches else [],
        "best": [preds.names[r] for r in best], "worst": [preds.names[r] for r in worst],
        "rerun_max_difference": inp.rerun_diff,
    }
    return pngs, {"rows": rows, "data": data}


def _facts(checkpoint: Path, inp: _Inputs, data: Mapping, results: Mapping) -> list[tuple[str, str]]:
    path = inp.run_pass.path
    how = ", ".join([f"theme fusion {path['theme_fusion']}", precision_name(path["amp"])]
                    + [k for k in ("fold_bn", "fuse_conv", "channels_last") if path[k]])
    facts = [("checkpoint", str(checkpoint)), ("variant", inp.model.variant),
             ("branches", ", ".join(inp.model.branches)),
             ("test images scored", str(data["n_images"])), ("SRCC", figures.fmt(data["srcc"])),
             ("PLCC", figures.fmt(data["plcc"])),
             ("model pass", f"{data['model_pass']['n_images']} images, batches of {inp.batch_size} in file order, "
                            f"{how}, on {path['device']} (the run's evaluation path)")]
    for key in ("accuracy", "mse", "emd", "best_epoch", "selection"):
        value = results.get(key)
        if value is not None:
            scale = ", 0..1 scale" if key == "mse" and not get_pretrained_cfg(inp.model.variant).is_distribution \
                else ""
            facts.append((f"{key} (results.json{scale})",
                          figures.fmt(value, 4) if isinstance(value, float) else str(value)))
    if inp.rerun_diff is not None:
        facts.append((f"model pass against {PREDICTIONS_CSV}", f"max |difference| {inp.rerun_diff:.2e}"))
    return facts


def _to_tensorboard(logs: Path, pngs: Mapping[str, bytes], rows: Sequence[ThemeRow], step: int) -> None:
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(str(logs))
    try:
        for name, png in pngs.items():
            writer.add_image(f"report/{name}", _png_rgb(png), step, dataformats="HWC")
        if rows:
            writer.add_text("report/per_theme", markdown_table(rows), step)
    finally:
        writer.close()


def _make_report(*, out_dir: Path, checkpoint: Path, preds_csv: Path | None, results: Mapping,
                 options: Mapping | None, max_images: int | None, device: str | torch.device,
                 num_workers: int, tensorboard: bool, attention_images: Sequence[str] | None,
                 allow_unsafe: bool, progress: bool, title: str,
                 complete_options: Callable[[Mapping], dict] | None = None) -> Report:
    if max_images is not None and max_images < 1:
        raise ReportError(f"--max_images must be positive, got {max_images}")
    dev = _device(device)
    inp, attention = _gather(checkpoint=checkpoint, preds_csv=preds_csv, results=results, options=options,
                             max_images=max_images, device=dev, num_workers=num_workers,
                             attention_images=attention_images, allow_unsafe=allow_unsafe, progress=progress,
                             complete_options=complete_options)
    pngs, extra = _figures(inp, attention, dev)
    rows, data = extra["rows"], {"checkpoint": str(checkpoint), **extra["data"]}

    fig_dir = out_dir / FIGURE_DIR
    paths = {name: fig_dir / f"{name}.png" for name in pngs}
    for name, png in pngs.items():
        _write_bytes(paths[name], png)
    data_path = fig_dir / DATA_JSON
    atomic_save_json(data, data_path)
    html_path = out_dir / HTML_NAME
    with atomic_write(html_path, "w") as f:
        f.write(render_html(title, _facts(checkpoint, inp, data, results), pngs, rows, inp.notes))
    if tensorboard:
        _to_tensorboard(out_dir / "logs", pngs, rows, int(results.get("best_epoch") or 0))
    mp = data["model_pass"]
    return Report(html_path, paths, data_path, data["n_images"], mp["n_images"],
                  np.asarray(mp["hidden_most_positive"]), np.asarray(mp["hidden_most_negative"]),
                  inp.rerun_diff, inp.notes)


def write_report(run_dir: str | os.PathLike, *, checkpoint: str | os.PathLike | None = None,
                 options: Mapping[str, Any] | None = None, max_images: int | None = None,
                 device: str | torch.device = "auto", num_workers: int = 0, tensorboard: bool = True,
                 attention_images: Sequence[str] | None = None, allow_unsafe: bool = False,
                 progress: bool = False, complete_options: Callable[[Mapping], dict] | None = None) -> Report:
    """The report of a finished run folder: ``RUN/report.html``, ``RUN/report/*.png`` and TensorBoard
    images in ``RUN/logs``.

    Scores come from ``RUN/test_predictions.csv``; the checkpoint (default: the run's best.pth, else
    last.pth) gives the model for the RGB attention and the theme hidden nodes, and its saved options
    the test split. ``options`` overrides them (e.g. a moved ``path_to_images``). ``max_images`` caps
    the model pass over the split. ``complete_options`` fills in the options a checkpoint lacks (one of
    an older version: ``option.complete_options``); without it they are used as they are.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise ReportError(f"run folder {run} not found")
    results = read_results(run / RESULTS_JSON)
    preds_csv = run / PREDICTIONS_CSV
    if not preds_csv.is_file():
        raise ReportError(f"{preds_csv} not found: is {run} a finished run folder?")
    ckpt = Path(checkpoint) if checkpoint is not None else run_checkpoint(run, results)
    return _make_report(out_dir=run, checkpoint=ckpt, preds_csv=preds_csv, results=results, options=options,
                        max_images=max_images, device=device, num_workers=num_workers, tensorboard=tensorboard,
                        attention_images=attention_images, allow_unsafe=allow_unsafe, progress=progress,
                        title=f"TANet report: {run.resolve().name}", complete_options=complete_options)


def write_split_report(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *,
                       options: Mapping[str, Any] | None = None, max_images: int | None = None,
                       device: str | torch.device = "auto", num_workers: int = 0, tensorboard: bool = True,
                       attention_images: Sequence[str] | None = None, allow_unsafe: bool = False,
                       progress: bool = False, complete_options: Callable[[Mapping], dict] | None = None) -> Report:
    """The report of a checkpoint on a test split (``options``: dataset, path_to_images, ...; a training
    checkpoint of this project brings its own), scored by one model pass, written into ``out_dir``;
    ``complete_options`` as for ``write_report`` (the defaults of the options not given)."""
    out = Path(out_dir)
    return _make_report(out_dir=out, checkpoint=Path(checkpoint), preds_csv=None, results={}, options=options,
                        max_images=max_images, device=device, num_workers=num_workers, tensorboard=tensorboard,
                        attention_images=attention_images, allow_unsafe=allow_unsafe, progress=progress,
                        title=f"TANet report: {Path(checkpoint).name}", complete_options=complete_options)
