"""The numbers behind the report's figures: per-theme rows, hidden-node counts, image picks."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from util import per_theme_metrics

from .figures import ThemeRow


@dataclass
class ScoreTable:
    """Scored images, one row each, on the 1..10 scale."""

    names: list[str]
    themes: list[str]
    true: np.ndarray
    pred: np.ndarray


def spread(values: np.ndarray, k: int) -> list[int]:
    """Indices of k values spread evenly over their sorted order (lowest, ..., highest)."""
    order = np.argsort(np.asarray(values), kind="stable")
    if order.size == 0 or k < 1:
        return []
    picks = np.unique(np.round(np.linspace(0, order.size - 1, min(k, order.size))).astype(int))
    return [int(order[p]) for p in picks]


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


def quiet_correlation(fn, a: np.ndarray, b: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(a, b)
