"""The report's figures: matplotlib Figures built from plain arrays, rendered headless (Agg).

No pyplot: every function returns a ``matplotlib.figure.Figure`` that ``png_bytes`` renders,
so importing this module changes no global matplotlib state.
"""
from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from helpers.preprocessing import IMAGENET_MEAN, IMAGENET_STD

TRUE_COLOUR = "#4C72B0"
PRED_COLOUR = "#DD8452"
SCORE_RANGE = (1.0, 10.0)
DPI = 100


@dataclass(frozen=True)
class ThemeRow:
    """One theme's line of the per-theme table (NaN metrics: fewer than 2 images, or constant scores)."""

    theme: str
    n: int
    srcc: float
    plcc: float
    mean_true: float
    mean_pred: float


@dataclass(frozen=True)
class ScoredImage:
    """An image with its scores, for the thumbnail, attention and distribution panels."""

    name: str
    true_score: float
    pred_score: float


def fmt(value: float, digits: int = 3) -> str:
    """A number for a label or table cell; NaN as ``n/a``."""
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes (RGBA, white background)."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    return buf.getvalue()


def denormalise(image: np.ndarray) -> np.ndarray:
    """An ImageNet-normalised (3, H, W) array back to displayable (H, W, 3) colours in [0, 1]."""
    a = np.asarray(image, dtype=np.float64)
    if a.ndim != 3 or a.shape[0] != 3:
        raise ValueError(f"denormalise expects a (3, H, W) array, got shape {a.shape}")
    mean = np.asarray(IMAGENET_MEAN)[:, None, None]
    std = np.asarray(IMAGENET_STD)[:, None, None]
    return np.clip(a * std + mean, 0.0, 1.0).transpose(1, 2, 0)


def sorted_by_srcc(rows: Sequence[ThemeRow]) -> list[ThemeRow]:
    """Best SRCC first; undefined (NaN) ones last, by name."""
    defined = sorted((r for r in rows if math.isfinite(r.srcc)), key=lambda r: (-r.srcc, r.theme))
    return defined + sorted((r for r in rows if not math.isfinite(r.srcc)), key=lambda r: r.theme)


def _theme_labels(rows: Sequence[ThemeRow]) -> list[str]:
    return [f"{r.theme} (n={r.n})" for r in rows]


def per_theme_metrics_figure(rows: Sequence[ThemeRow]) -> Figure:
    """Horizontal bars of SRCC and PLCC per theme, sorted by SRCC, with image counts; NaN shown as n/a."""
    rows = sorted_by_srcc(rows)
    if not rows:
        raise ValueError("per_theme_metrics_figure: no themes")
    fig = Figure(figsize=(8, 1.5 + 0.32 * len(rows)))
    ax = fig.add_subplot()
    y = np.arange(len(rows))
    h = 0.4
    for offset, key, colour, label in ((-h / 2, "srcc", TRUE_COLOUR, "SRCC"), (h / 2, "plcc", PRED_COLOUR, "PLCC")):
        values = np.array([getattr(r, key) for r in rows], dtype=float)
        ax.barh(y + offset, np.nan_to_num(values, nan=0.0), height=h, color=colour, label=label)
        for yi, v in zip(y + offset, values):
            ax.text(0.0 if not math.isfinite(v) else v, yi, f" {fmt(v, 2)} ", va="center", fontsize=7,
                    ha="left" if not math.isfinite(v) or v >= 0 else "right")
    ax.set_yticks(y, _theme_labels(rows), fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_xlim(-1.1, 1.1)
    ax.set_xlabel("correlation of predicted and true scores within the theme")
    ax.set_title("Per-theme SRCC and PLCC (sorted by SRCC)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def per_theme_means_figure(rows: Sequence[ThemeRow]) -> Figure:
    """Mean true and mean predicted score per theme (same order as the metrics figure)."""
    rows = sorted_by_srcc(rows)
    if not rows:
        raise ValueError("per_theme_means_figure: no themes")
    fig = Figure(figsize=(8, 1.5 + 0.32 * len(rows)))
    ax = fig.add_subplot()
    y = np.arange(len(rows))
    true = np.array([r.mean_true for r in rows])
    pred = np.array([r.mean_pred for r in rows])
    ax.hlines(y, np.minimum(true, pred), np.maximum(true, pred), color="grey", linewidth=1)
    ax.scatter(true, y, color=TRUE_COLOUR, label="mean true score", zorder=3)
    ax.scatter(pred, y, color=PRED_COLOUR, marker="D", label="mean predicted score", zorder=3)
    ax.set_yticks(y, _theme_labels(rows), fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(*SCORE_RANGE)
    ax.set_xlabel("score (1..10)")
    ax.set_title("Mean true and predicted score per theme")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def score_scatter_figure(true: np.ndarray, pred: np.ndarray, srcc: float, plcc: float) -> Figure:
    """Predicted against true score, with the identity line."""
    true, pred = np.asarray(true, dtype=float), np.asarray(pred, dtype=float)
    fig = Figure(figsize=(5.5, 5.5))
    ax = fig.add_subplot()
    ax.scatter(true, pred, s=8 if true.size > 2000 else 16, alpha=0.3 if true.size > 2000 else 0.7,
               color=TRUE_COLOUR, edgecolors="none")
    ax.plot(SCORE_RANGE, SCORE_RANGE, color="black", linewidth=1, linestyle="--", label="predicted = true")
    ax.set_xlim(*SCORE_RANGE)
    ax.set_ylim(*SCORE_RANGE)
    ax.set_aspect("equal")
    ax.set_xlabel("true score")
    ax.set_ylabel("predicted score")
    ax.set_title(f"{true.size} images: SRCC {fmt(srcc)}, PLCC {fmt(plcc)}")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def score_histograms_figure(true: np.ndarray, pred: np.ndarray) -> Figure:
    """Histograms of the true and the predicted scores on shared bins."""
    true, pred = np.asarray(true, dtype=float), np.asarray(pred, dtype=float)
    bins = np.linspace(*SCORE_RANGE, 37)
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    ax.hist(true, bins=bins, alpha=0.6, color=TRUE_COLOUR, label=f"true (mean {np.mean(true):.2f}, "
                                                                  f"std {np.std(true):.2f})")
    ax.hist(pred, bins=bins, alpha=0.6, color=PRED_COLOUR, label=f"predicted (mean {np.mean(pred):.2f}, "
                                                                  f"std {np.std(pred):.2f})")
    ax.set_xlim(*SCORE_RANGE)
    ax.set_xlabel("score (1..10)")
    ax.set_ylabel("images")
    ax.set_title("Distribution of true and predicted scores")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _grid(n: int, columns: int) -> tuple[int, int]:
    cols = max(1, min(columns, n))
    return math.ceil(n / cols), cols


def distributions_figure(images: Sequence[ScoredImage], true_dist: np.ndarray, pred_dist: np.ndarray) -> Figure:
    """(ava) The true vote distribution and the predicted distribution over 1..10 of a few images."""
    true_dist, pred_dist = np.asarray(true_dist, dtype=float), np.asarray(pred_dist, dtype=float)
    if not images or true_dist.shape != (len(images), 10) or pred_dist.shape != true_dist.shape:
        raise ValueError(f"distributions_figure: expected {len(images)} (10,) distributions, "
                         f"got {true_dist.shape} and {pred_dist.shape}")
    rows, cols = _grid(len(images), 3)
    fig = Figure(figsize=(4 * cols, 3 * rows))
    k = np.arange(1, 11)
    for i, im in enumerate(images):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.bar(k - 0.2, true_dist[i], width=0.4, color=TRUE_COLOUR, label="votes")
        ax.bar(k + 0.2, pred_dist[i], width=0.4, color=PRED_COLOUR, label="predicted")
        ax.set_xticks(k)
        ax.set_title(f"{im.name}\ntrue mean {im.true_score:.2f}, predicted {im.pred_score:.2f}", fontsize=8)
        if i == 0:
            ax.legend(fontsize=7)
    fig.suptitle("Predicted against true score distributions")
    fig.tight_layout()
    return fig


def rgb_attention_figure(images: Sequence[ScoredImage], inputs: np.ndarray, patches: np.ndarray,
                         similarity: np.ndarray) -> Figure:
    """Per image: the model's input, its 12x12 patch colours and the 144x144 cosine-similarity matrix.

    ``inputs`` (N, 3, 224, 224) and ``patches`` (N, 3, 12, 12) are ImageNet-normalised (shown
    de-normalised); ``similarity`` is (N, 144, 144), as the model computes it. An image whose true
    score is NaN (a photo scored on the web page) is titled with its predicted score alone.
    """
    n = len(images)
    if n == 0 or inputs.shape[0] != n or patches.shape[0] != n or similarity.shape[0] != n:
        raise ValueError(f"rgb_attention_figure: expected {n} inputs, patches and similarity matrices")
    fig = Figure(figsize=(12, 0.5 + 3.7 * n))  # the 0.5: room for the title and x label of a single row
    axes = fig.subplots(n, 3, squeeze=False)
    for i, im in enumerate(images):
        a, b, c = axes[i]
        a.imshow(denormalise(inputs[i]))
        truth = f"true {im.true_score:.2f}, " if math.isfinite(im.true_score) else ""  # NaN: not known
        a.set_title(f"{im.name}\n{truth}predicted {im.pred_score:.2f}", fontsize=9)
        b.imshow(denormalise(patches[i]), interpolation="nearest")
        b.set_title("12x12 patch colours (the 144 tokens)", fontsize=9)
        shown = c.imshow(similarity[i], cmap="RdBu_r", vmin=-1.0, vmax=1.0, interpolation="nearest")
        c.set_title("144x144 colour similarity (cosine)", fontsize=9)
        c.set_xlabel("patch index", fontsize=8)
        c.set_ylabel("patch index", fontsize=8)
        fig.colorbar(shown, ax=c, fraction=0.046, pad=0.04)
        for ax in (a, b):
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("RGB-distribution attention: what the RGBNet branch sees")
    fig.tight_layout()
    return fig


def hidden_nodes_figure(most_positive: np.ndarray, most_negative: np.ndarray, n_images: int) -> Figure:
    """Paper, Figure 7: per theme hidden node, how many images have it as their most positive
    and as their most negative node."""
    pos, neg = np.asarray(most_positive), np.asarray(most_negative)
    if pos.shape != neg.shape or pos.ndim != 1:
        raise ValueError(f"hidden_nodes_figure: counts of different shapes {pos.shape} and {neg.shape}")
    fig = Figure(figsize=(11, 6))
    top, bottom = fig.subplots(2, 1, sharex=True)
    nodes = np.arange(pos.size)
    top.bar(nodes, pos, color="#C44E52", width=0.8)
    top.set_ylabel("images")
    top.set_title(f"Most positive hidden node of each image ({n_images} images)")
    bottom.bar(nodes, neg, color=TRUE_COLOUR, width=0.8)
    bottom.set_ylabel("images")
    bottom.set_title("Most negative hidden node of each image")
    bottom.set_xlabel("theme hidden node (tygertnet.fc1 output, after BatchNorm and PReLU)")
    bottom.set_xlim(-1, pos.size)
    for ax in (top, bottom):
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def best_worst_figure(best: Sequence[tuple[ScoredImage, np.ndarray]],
                      worst: Sequence[tuple[ScoredImage, np.ndarray]]) -> Figure:
    """Thumbnails of the best and the worst predicted images, each with its true and predicted score."""
    cols = max(len(best), len(worst), 1)
    fig = Figure(figsize=(2.4 * cols, 6))
    axes = fig.subplots(2, cols, squeeze=False)
    for row, (label, items) in enumerate((("best", best), ("worst", worst))):
        for j in range(cols):
            ax = axes[row][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(items):
                ax.set_axis_off()
                continue
            im, pixels = items[j]
            ax.imshow(pixels)
            ax.set_title(f"{label} {j + 1}: {im.name}\ntrue {im.true_score:.2f}, pred {im.pred_score:.2f}",
                         fontsize=8)
    fig.suptitle("Best (top) and worst (bottom) predicted images")
    fig.tight_layout()
    return fig
