"""The analysis report of a trained TANet: PNG figures, one self-contained HTML page and the same
figures in TensorBoard, from a finished run folder or from a checkpoint plus a data split."""
from __future__ import annotations

import base64
import html
import io
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

import figures
from dataset import build_datasets, check_images_exist, collate_skip_none, load_image, resolve_csv_dir
from engine import autocast, make_loader, to_device
from figures import ScoredImage, ThemeRow
from models import TANet, read_tanet_checkpoint
from models.rgb_attention import rgb_similarity
from models.weights import load_checked
from option import DATASET_DEFAULTS
from runtime import resolve_device
from safe_io import atomic_save_json, atomic_write
from util import distribution_mean, per_theme_metrics, plcc, srcc

PREDICTIONS_CSV = "test_predictions.csv"
RESULTS_JSON = "results.json"
HTML_NAME = "report.html"
FIGURE_DIR = "report"  # the PNGs and report_data.json, beside report.html
DATA_JSON = "report_data.json"
RUN_CHECKPOINTS = ("best.pth", "last.pth")
PREDICTION_COLUMNS = ("image", "theme", "true_score", "pred_score")
N_ATTENTION = 3  # images of the RGB-attention figure, spread over the true score
N_DISTRIBUTIONS = 6  # images of the ava distribution figure
N_THUMBNAILS = 5  # best and worst images each
THUMBNAIL_PX = 192


class ReportError(ValueError):
    """The report cannot be made: a missing or unusable file or option (the message names it)."""


@dataclass
class Report:
    """What ``write_report`` wrote and the numbers behind the model-pass figures."""

    html: Path
    figures: dict[str, Path]  # figure name -> PNG
    data: Path  # report_data.json
    n_images: int  # images of the predictions (scatter, per theme, thumbnails)
    n_model_images: int  # images of the batch-fused model pass (hidden nodes, distributions)
    hidden_most_positive: np.ndarray  # (100,) images whose most positive theme hidden node is i
    hidden_most_negative: np.ndarray
    rerun_max_difference: float | None  # max |pass - test_predictions.csv| on 1..10, when comparable
    notes: list[str] = field(default_factory=list)


# --- inputs -----------------------------------------------------------------------------------

@dataclass
class ScoreTable:
    """Scored images, one row each, on the 1..10 scale."""

    names: list[str]
    themes: list[str]
    true: np.ndarray
    pred: np.ndarray


def read_predictions(path: Path) -> ScoreTable:
    """``test_predictions.csv`` (image,theme,true_score,pred_score) with every score checked finite."""
    if not path.is_file():
        raise ReportError(f"{path} not found: a finished run folder holds it (or pass --checkpoint with a "
                          f"split, without a run folder)")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path} is not a readable CSV: {exc}") from None
    missing = [c for c in PREDICTION_COLUMNS if c not in df.columns]
    if missing:
        raise ReportError(f"{path} lacks the column(s) {', '.join(missing)} (expected {','.join(PREDICTION_COLUMNS)})")
    if df.empty:
        raise ReportError(f"{path} holds no predictions")
    scores = {}
    for col in ("true_score", "pred_score"):
        values = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=float)
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            i = int(bad[0])
            raise ReportError(f"{path}, row {i + 2} ({df['image'].iloc[i]}): {col} {df[col].iloc[i]!r} "
                              f"is not a finite number")
        scores[col] = values
    return ScoreTable(df["image"].tolist(), df["theme"].tolist(), scores["true_score"], scores["pred_score"])


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
    """The run's test split as training built it (its --max_images and --skip_missing included)."""
    name = opts["dataset"]
    demo = opts.get("demo_images") or (480, 160)
    sets = build_datasets(
        name, variant=variant, image_dir=opts.get("path_to_images"),
        csv_dir=resolve_csv_dir(opts["dataset"], opts.get("path_to_save_csv")), validation="test",
        score_range=tuple(opts.get("score_range") or (1.0, 10.0)), skip_bad=bool(opts.get("skip_bad")),
        train_csv=opts.get("train_csv"), test_csv=opts.get("test_csv"),
        demo_options={"n_train": int(demo[0]), "n_test": int(demo[1]), "seed": 0},
    )
    ds = sets["test"]
    limit = opts.get("max_images")
    if limit is not None and len(ds) > int(limit):
        ds.keep([i < int(limit) for i in range(len(ds))])
    return check_images_exist(ds, skip_missing=bool(opts.get("skip_missing")))


def load_model(path: Path, state: Mapping, meta: Mapping, opts: Mapping, variant_hint: str | None,
               device: torch.device) -> TANet:
    """The checkpoint's TANet (``read_tanet_checkpoint``'s state and metadata) in eval mode, batch theme fusion."""
    variant = opts.get("variant") or meta.get("variant") or variant_hint
    if variant is None:
        raise ReportError(f"cannot tell the variant of {path}: pass --variant")
    if meta.get("variant") and meta["variant"] != variant:
        raise ReportError(f"{path} is a {meta['variant']!r} checkpoint but the options ask for {variant!r}")
    model = TANet(variant, theme_fusion="batch")
    load_checked(model, state, str(path))
    return model.to(device).eval()


# --- model passes -----------------------------------------------------------------------------

@dataclass
class ModelPass:
    """The batch-fused model outputs of the first images of the split, in file order."""

    index: list[int]
    output: np.ndarray  # (N, 1) or (N, 10)
    hidden: np.ndarray  # (N, 100) theme hidden nodes

    def pred(self, variant: str) -> np.ndarray:
        """Predicted score on 1..10."""
        return self.output[:, 0] * 10.0 if variant == "tad66k" else distribution_mean(self.output)


@torch.no_grad()
def model_pass(model: TANet, dataset, *, batch_size: int, limit: int | None, device: torch.device,
               num_workers: int, progress: bool, amp: str = "none", channels_last: bool = False) -> ModelPass:
    """The reference protocol: batches of ``batch_size`` in file order, theme fusion over the batch,
    in the run's precision and memory format."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    subset = torch.utils.data.Subset(dataset, range(n))
    loader = make_loader(subset, batch_size=batch_size, train=False, num_workers=num_workers, device=device,
                         collate_fn=collate_skip_none)
    index, outputs, hidden = [], [], []
    for batch in tqdm(loader, desc="report", disable=not progress, leave=False, dynamic_ncols=True):
        if batch is None:
            continue
        x = to_device(batch["image"], device, channels_last)
        with warnings.catch_warnings(), autocast(device, amp):
            warnings.simplefilter("ignore", RuntimeWarning)  # ava at batch size 1: handled below
            out = model.forward_branches(x)
        h = out["theme_hidden"]
        if h is None:  # a lone ava image: the theme matrix is skipped, the hidden nodes are not batch-dependent
            h = model.tygertnet.hidden(model.res365_last(x))
        index += [int(i) for i in batch["index"]]
        outputs.append(out["output"].float().cpu().numpy())
        hidden.append(h.float().cpu().numpy())
    if not index:
        raise ReportError(f"no image of {dataset.source} could be read for the model pass")
    return ModelPass(index, np.concatenate(outputs), np.concatenate(hidden))


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


def spread(values: np.ndarray, k: int) -> list[int]:
    """Indices of k values spread evenly over their sorted order (lowest, ..., highest)."""
    order = np.argsort(np.asarray(values), kind="stable")
    if order.size == 0 or k < 1:
        return []
    picks = np.unique(np.round(np.linspace(0, order.size - 1, min(k, order.size))).astype(int))
    return [int(order[p]) for p in picks]


# --- statistics -------------------------------------------------------------------------------

def theme_rows(preds: ScoreTable) -> list[ThemeRow]:
    """Per non-blank theme: image count, SRCC, PLCC (NaN below 2 images or for constant scores), mean scores."""
    keep = [i for i, t in enumerate(preds.themes) if str(t).strip()]
    if not keep:
        return []
    themes = [str(preds.themes[i]) for i in keep]
    true, pred = preds.true[keep], preds.pred[keep]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        metrics = per_theme_metrics(pred, true, themes)
    groups = np.asarray(themes)
    return [ThemeRow(theme, m["n"], m["srcc"], m["plcc"], float(true[groups == theme].mean()),
                     float(pred[groups == theme].mean())) for theme, m in metrics.items()]


def hidden_counts(hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per hidden node: how many images have it as their most positive, and as their most negative node."""
    nodes = hidden.shape[1]
    return (np.bincount(hidden.argmax(axis=1), minlength=nodes),
            np.bincount(hidden.argmin(axis=1), minlength=nodes))


def _quiet_correlation(fn, a: np.ndarray, b: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(a, b)


# --- outputs ----------------------------------------------------------------------------------

CAPTIONS = {
    "per_theme_metrics": "SRCC and PLCC between predicted and true scores within each theme, best SRCC first; "
                         "n is the theme's number of images. Themes with fewer than 2 images (or constant "
                         "scores) have no correlation: n/a.",
    "per_theme_means": "Mean true score (circle) and mean predicted score (diamond) of each theme: a gap shows "
                       "a theme the model over- or under-rates as a whole.",
    "scatter": "Every image's predicted against its true score; points on the dashed line are exact.",
    "histograms": "How true and predicted scores are spread: a narrow predicted histogram means the model "
                  "stays near the mean.",
    "distributions": "ava variant: the true vote distribution (votes) and the predicted distribution over the "
                     "scores 1..10 of images spread over the true score.",
    "rgb_attention": "The RGB-distribution attention (RGBNet): the model's 224x224 input, its 12x12 average "
                     "patch colours (de-normalised for display) and the 144x144 cosine similarity of the "
                     "ImageNet-normalised patch colours that feeds head_rgb (patches in row-major order).",
    "hidden_nodes": "Theme hidden-node activations (paper, Figure 7): for each of the 100 hidden nodes of the "
                    "theme branch (tygertnet), how many images have it as their most positive (top) and most "
                    "negative (bottom) node. Node indices are arbitrary: compare the shape of the "
                    "counts (a few dominant nodes or a spread), not the positions, with the paper.",
    "best_worst": "The images the model scores highest and lowest, with their true and predicted scores.",
}
TITLES = {
    "per_theme_metrics": "Per-theme SRCC and PLCC", "per_theme_means": "Mean scores per theme",
    "scatter": "Predicted against true scores", "histograms": "Score histograms",
    "distributions": "Predicted against true score distributions", "rgb_attention": "RGB-distribution attention",
    "hidden_nodes": "Theme hidden-node activations", "best_worst": "Best and worst scored images",
}


def _png_rgb(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as img:
        return np.asarray(img.convert("RGB"))


def _theme_table(rows: Sequence[ThemeRow]) -> str:
    head = "<tr><th>theme</th><th>images</th><th>SRCC</th><th>PLCC</th><th>mean true</th><th>mean predicted</th></tr>"
    body = "".join(
        f"<tr><td>{html.escape(r.theme)}</td><td>{r.n}</td><td>{figures.fmt(r.srcc)}</td><td>{figures.fmt(r.plcc)}"
        f"</td><td>{figures.fmt(r.mean_true, 2)}</td><td>{figures.fmt(r.mean_pred, 2)}</td></tr>"
        for r in figures.sorted_by_srcc(rows))
    return f'<table class="themes">{head}{body}</table>'


def _markdown_table(rows: Sequence[ThemeRow]) -> str:
    lines = ["| theme | images | SRCC | PLCC | mean true | mean predicted |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.theme} | {r.n} | {figures.fmt(r.srcc)} | {figures.fmt(r.plcc)} | {figures.fmt(r.mean_true, 2)} "
              f"| {figures.fmt(r.mean_pred, 2)} |" for r in figures.sorted_by_srcc(rows)]
    return "\n".join(lines)


_SCRIPT = ("window.addEventListener('load',function(){var b=[].filter.call(document.images,function(i){"
           "return !i.complete||i.naturalWidth===0;});document.body.setAttribute('data-broken-images',b.length);});")
_STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
          "img{max-width:100%;border:1px solid #ddd}table{border-collapse:collapse;margin:1em 0}"
          "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
          "p.caption{color:#444}p.note{color:#8a4b00}")


def render_html(title: str, facts: Sequence[tuple[str, str]], pngs: Mapping[str, bytes],
                rows: Sequence[ThemeRow], notes: Sequence[str]) -> str:
    """One self-contained page: the facts table, then every figure (embedded PNG) with its caption."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>",
             f"<h1>{html.escape(title)}</h1><table class='facts'>"]
    parts += [f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in facts]
    parts.append("</table>")
    parts += [f"<p class='note'>{html.escape(n)}</p>" for n in notes]
    for name, png in pngs.items():
        data = base64.b64encode(png).decode("ascii")
        parts.append(f"<h2 id='{name}'>{html.escape(TITLES[name])}</h2>"
                     f"<p class='caption'>{html.escape(CAPTIONS[name])}</p>"
                     f"<img alt='{html.escape(TITLES[name])}' src='data:image/png;base64,{data}'>")
        if name == "per_theme_metrics":
            parts.append(_theme_table(rows))
    parts.append("</body></html>\n")
    return "".join(parts)


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


# --- the report -------------------------------------------------------------------------------

def _device(device: str | torch.device) -> torch.device:
    return device if isinstance(device, torch.device) else resolve_device(str(device))


def _thumbnail(path: str) -> np.ndarray:
    img = load_image(path)
    img.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    return np.asarray(img)


@dataclass
class _Inputs:
    """What the figures are made from."""

    model: TANet
    dataset: Any  # the test split (dataset._ImageTable)
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


def _check_rerun(preds: ScoreTable, names: Sequence[str], pass_pred: np.ndarray, notes: list[str]) -> float:
    """Max |model pass - test_predictions.csv| over the images of both."""
    csv_pred = dict(zip(preds.names, preds.pred))
    diff = max((abs(csv_pred[n] - p) for n, p in zip(names, pass_pred) if n in csv_pred), default=0.0)
    if diff > 1e-3:
        notes.append(f"The model pass differs from {PREDICTIONS_CSV} by up to {diff:.4f} "
                     f"(another checkpoint, batch size or precision?)")
    return float(diff)


def _gather(*, checkpoint: Path, preds_csv: Path | None, results: Mapping, options: Mapping | None,
            max_images: int | None, device: torch.device, num_workers: int,
            attention_images: Sequence[str] | None, allow_unsafe: bool, progress: bool) -> tuple[_Inputs, list[int]]:
    """Load the checkpoint and the split, read (or make) the predictions, run the model pass."""
    if not checkpoint.is_file():
        raise ReportError(f"checkpoint {checkpoint} not found")
    state, meta = read_tanet_checkpoint(checkpoint, allow_unsafe=allow_unsafe)
    opts = merge_options(meta.get("options"), options)
    if not opts.get("dataset"):
        raise ReportError(f"{checkpoint} holds no run options: pass --dataset (and --path_to_images, "
                          f"--path_to_save_csv as for training)")
    model = load_model(checkpoint, state, meta, opts, results.get("variant"), device)
    del state
    batch_size = int(opts.get("eval_batch_size") or opts.get("batch_size")
                     or DATASET_DEFAULTS[opts["dataset"]]["batch_size"])
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

    amp = opts.get("amp") or "none"
    if amp == "fp16" and device.type != "cuda":
        amp = "none"
    run_pass = model_pass(model, dataset, batch_size=batch_size, limit=max_images, device=device,
                          num_workers=num_workers, progress=progress, amp=amp,
                          channels_last=bool(opts.get("channels_last")))
    pass_names = [Path(dataset.names[i]).name for i in run_pass.index]
    pass_pred = run_pass.pred(model.variant)
    rerun_diff = None
    if csv is not None and opts.get("theme_fusion", "batch") != "batch":
        notes.append(f"{PREDICTIONS_CSV} was scored with theme fusion {opts['theme_fusion']!r}; the model pass "
                     f"(hidden nodes) uses batch fusion, the reference protocol")
    elif csv is not None:
        rerun_diff = _check_rerun(csv, pass_names, pass_pred, notes)
    if csv is None:
        csv = ScoreTable(pass_names, [dataset.themes[i] for i in run_pass.index],
                         dataset.scores[run_pass.index].astype(float), pass_pred.astype(float))
        attention = _attention_rows(attention_images, csv)
    inputs = _Inputs(model, dataset, csv, [by_name[n] for n in csv.names], run_pass, batch_size, rerun_diff, notes)
    return inputs, attention


def _figures(inp: _Inputs, attention: Sequence[int], device: torch.device) -> tuple[dict[str, bytes], dict]:
    """Every figure as PNG bytes (in report order) and the numbers behind them."""
    preds, dataset, run_pass, variant = inp.preds, inp.dataset, inp.run_pass, inp.model.variant
    pngs: dict[str, bytes] = {}
    rows = theme_rows(preds)
    s, c = _quiet_correlation(srcc, preds.pred, preds.true), _quiet_correlation(plcc, preds.pred, preds.true)
    if rows:
        pngs["per_theme_metrics"] = figures.png_bytes(figures.per_theme_metrics_figure(rows))
        pngs["per_theme_means"] = figures.png_bytes(figures.per_theme_means_figure(rows))
    else:
        inp.notes.append("The split has no themes: no per-theme figures.")
    pngs["scatter"] = figures.png_bytes(figures.score_scatter_figure(preds.true, preds.pred, s, c))
    pngs["histograms"] = figures.png_bytes(figures.score_histograms_figure(preds.true, preds.pred))

    if variant == "ava":  # the distributions come from the pass (batch-fused outputs)
        picks = spread(dataset.scores[run_pass.index], N_DISTRIBUTIONS)
        idx = [run_pass.index[p] for p in picks]
        pass_pred = run_pass.pred(variant)
        items = [ScoredImage(Path(dataset.names[i]).name, float(dataset.scores[i]), float(pass_pred[p]))
                 for i, p in zip(idx, picks)]
        pngs["distributions"] = figures.png_bytes(
            figures.distributions_figure(items, dataset.targets[idx], run_pass.output[picks]))

    def scored(row: int) -> ScoredImage:
        return ScoredImage(preds.names[row], float(preds.true[row]), float(preds.pred[row]))

    x, patches, similarity = rgb_attention_inputs(inp.model, dataset, [inp.row_index[r] for r in attention], device)
    pngs["rgb_attention"] = figures.png_bytes(
        figures.rgb_attention_figure([scored(r) for r in attention], x, patches, similarity))

    most_pos, most_neg = hidden_counts(run_pass.hidden)
    pngs["hidden_nodes"] = figures.png_bytes(figures.hidden_nodes_figure(most_pos, most_neg, len(run_pass.index)))

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
        "rgb_attention_images": [preds.names[r] for r in attention],
        "best": [preds.names[r] for r in best], "worst": [preds.names[r] for r in worst],
        "rerun_max_difference": inp.rerun_diff,
    }
    return pngs, {"rows": rows, "data": data}


def _facts(checkpoint: Path, inp: _Inputs, data: Mapping, results: Mapping) -> list[tuple[str, str]]:
    facts = [("checkpoint", str(checkpoint)), ("variant", inp.model.variant),
             ("test images scored", str(data["n_images"])), ("SRCC", figures.fmt(data["srcc"])),
             ("PLCC", figures.fmt(data["plcc"])),
             ("model pass", f"{data['model_pass']['n_images']} images, batches of {inp.batch_size} in file order, "
                            f"batch theme fusion (the reference protocol)")]
    for key in ("accuracy", "mse", "emd", "best_epoch", "selection"):
        value = results.get(key)
        if value is not None:
            scale = ", 0..1 scale" if key == "mse" and inp.model.variant == "tad66k" else ""
            facts.append((f"{key} (results.json{scale})", figures.fmt(value, 4) if isinstance(value, float) else str(value)))
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
            writer.add_text("report/per_theme", _markdown_table(rows), step)
    finally:
        writer.close()


def _make_report(*, out_dir: Path, checkpoint: Path, preds_csv: Path | None, results: Mapping,
                 options: Mapping | None, max_images: int | None, device: str | torch.device,
                 num_workers: int, tensorboard: bool, attention_images: Sequence[str] | None,
                 allow_unsafe: bool, progress: bool, title: str) -> Report:
    if max_images is not None and max_images < 1:
        raise ReportError(f"--max_images must be positive, got {max_images}")
    dev = _device(device)
    inp, attention = _gather(checkpoint=checkpoint, preds_csv=preds_csv, results=results, options=options,
                             max_images=max_images, device=dev, num_workers=num_workers,
                             attention_images=attention_images, allow_unsafe=allow_unsafe, progress=progress)
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
                 progress: bool = False) -> Report:
    """The report of a finished run folder: ``RUN/report.html``, ``RUN/report/*.png`` and TensorBoard
    images in ``RUN/logs``.

    Scores come from ``RUN/test_predictions.csv``; the checkpoint (default: the run's best.pth, else
    last.pth) gives the model for the RGB attention and the theme hidden nodes, and its saved options
    the test split. ``options`` overrides them (e.g. a moved ``path_to_images``). ``max_images`` caps
    the model pass over the split.
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
                        title=f"TANet report: {run.resolve().name}")


def write_split_report(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *,
                       options: Mapping[str, Any] | None = None, max_images: int | None = None,
                       device: str | torch.device = "auto", num_workers: int = 0, tensorboard: bool = True,
                       attention_images: Sequence[str] | None = None, allow_unsafe: bool = False,
                       progress: bool = False) -> Report:
    """The report of a checkpoint on a test split (``options``: dataset, path_to_images, ...; a training
    checkpoint of this project brings its own), scored by one model pass, written into ``out_dir``."""
    out = Path(out_dir)
    return _make_report(out_dir=out, checkpoint=Path(checkpoint), preds_csv=None, results={}, options=options,
                        max_images=max_images, device=device, num_workers=num_workers, tensorboard=tensorboard,
                        attention_images=attention_images, allow_unsafe=allow_unsafe, progress=progress,
                        title=f"TANet report: {Path(checkpoint).name}")


__all__ = ["Report", "ReportError", "write_report", "write_split_report", "read_predictions",
           "theme_rows", "hidden_counts", "spread", "render_html"]
