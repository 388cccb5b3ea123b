"""Evaluation metrics and EMD losses (the reference's ``util.py``): SRCC, PLCC, accuracy, MSE, EMD,
the distribution mean and spread, per-theme metrics.

A bottom-layer helper: it imports nothing of ours.
"""

from __future__ import annotations

import math
import warnings
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

NUM_BINS = 10  # AVA score distributions: votes for scores 1..10

__all__ = [
    "NUM_BINS", "srcc", "plcc", "accuracy", "mse", "emd", "emd_loss", "emd_loss_reference",
    "distribution_mean", "distribution_std", "srcc_accuracy_ratio", "per_theme_metrics",
    "evaluation_metrics", "correlation_undefined",
]


def _is_tensor(x: Any) -> bool:
    """Whether ``x`` is a torch tensor, without importing torch (no tensor exists before torch is)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _as_array(x: Any, name: str) -> np.ndarray:
    """Any of list / numpy / torch -> float64 numpy array (a copy detached from autograd)."""
    if _is_tensor(x):
        return x.detach().to("cpu").double().numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: expected numbers, got {type(x).__name__} ({exc})") from None


def _scores(x: Any, name: str) -> np.ndarray:
    """One score per image: shape (N,) or (N, 1) -> (N,)."""
    a = _as_array(x, name)
    if a.ndim == 0:
        a = a.reshape(1)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise ValueError(f"{name}: expected one score per image, shape (N,) or (N, 1), got {a.shape}")
    return a


def _score_pair(pred: Any, true: Any) -> tuple[np.ndarray, np.ndarray]:
    p, t = _scores(pred, "pred"), _scores(true, "true")
    if p.shape != t.shape:
        raise ValueError(f"pred has {p.size} scores but true has {t.size}")
    return p, t


def _warn_nan(metric: str, reason: str) -> float:
    warnings.warn(f"{metric} is undefined ({reason}); returning NaN", RuntimeWarning, stacklevel=3)
    return float("nan")


def _nonfinite_reason(*arrays: np.ndarray) -> str | None:
    for a in arrays:
        if not np.all(np.isfinite(a)):
            return "input contains NaN or infinite values"
    return None


def correlation_undefined(p: np.ndarray, t: np.ndarray) -> str | None:
    """Why a correlation of p and t cannot be computed, or None when it can."""
    if p.size < 2:
        return f"needs at least 2 items, got {p.size}"
    reason = _nonfinite_reason(p, t)
    if reason:
        return reason
    if np.all(p == p[0]):
        return "predictions are constant"
    if np.all(t == t[0]):
        return "ground-truth scores are constant"
    return None


def _srcc(p: np.ndarray, t: np.ndarray) -> float:
    import scipy.stats  # here: scoring images needs no SciPy, and importing it takes a while

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # we report undefined cases ourselves
        return float(scipy.stats.spearmanr(p, t)[0])


def _plcc(p: np.ndarray, t: np.ndarray) -> float:
    import scipy.stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(scipy.stats.pearsonr(p, t)[0])


def srcc(pred: Any, true: Any) -> float:
    """Spearman rank correlation; NaN (with one RuntimeWarning) when undefined."""
    p, t = _score_pair(pred, true)
    reason = correlation_undefined(p, t)
    return _warn_nan("SRCC", reason) if reason else _srcc(p, t)


def plcc(pred: Any, true: Any) -> float:
    """Pearson linear correlation; NaN (with one RuntimeWarning) when undefined."""
    p, t = _score_pair(pred, true)
    reason = correlation_undefined(p, t)
    return _warn_nan("PLCC", reason) if reason else _plcc(p, t)


def accuracy(pred: Any, true: Any, threshold: float = 5.0) -> float:
    """Binary accuracy: fraction of images where pred and true agree on "good" (score > threshold)."""
    p, t = _score_pair(pred, true)
    if p.size == 0:
        return _warn_nan("accuracy", "no images")
    reason = _nonfinite_reason(p, t)
    if reason:
        return _warn_nan("accuracy", reason)
    return float(np.mean((p > threshold) == (t > threshold)))


def mse(pred: Any, true: Any) -> float:
    """Mean squared error of the scores."""
    p, t = _score_pair(pred, true)
    if p.size == 0:
        return _warn_nan("MSE", "no images")
    reason = _nonfinite_reason(p, t)
    if reason:
        return _warn_nan("MSE", reason)
    return float(np.mean((p - t) ** 2))


def _distribution_pair(p: Any, q: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_array(p, "p"), _as_array(q, "q")
    if a.ndim == 1:
        a = a[None, :]
    if b.ndim == 1:
        b = b[None, :]
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"p and q must both be (N, bins) distributions, got {a.shape} and {b.shape}")
    return a, b


def emd(p: Any, q: Any, r: float = 1) -> float:
    """Earth mover's distance, NIMA form: per image (mean_k |CDF_p - CDF_q|^r)^(1/r), averaged over images."""
    if r <= 0:
        raise ValueError(f"emd: r must be > 0, got {r}")
    a, b = _distribution_pair(p, q)
    if a.shape[0] == 0:
        return _warn_nan("EMD", "no images")
    reason = _nonfinite_reason(a, b)
    if reason:
        return _warn_nan("EMD", reason)
    diff = np.abs(np.cumsum(a, axis=1) - np.cumsum(b, axis=1))
    per_image = np.mean(diff ** r, axis=1) ** (1.0 / r)
    return float(np.mean(per_image))


def _safe_root(x: torch.Tensor, r: float) -> torch.Tensor:
    """x ** (1/r) with a zero (not NaN) gradient where x == 0 (e.g. a perfect prediction)."""
    import torch

    if r == 1:
        return x
    positive = x > 0
    safe = torch.where(positive, x, torch.ones_like(x))
    return torch.where(positive, safe ** (1.0 / r), torch.zeros_like(x))


def _torch_distribution_pair(p: torch.Tensor, q: torch.Tensor) -> None:
    if not _is_tensor(p) or not _is_tensor(q):
        raise TypeError("emd_loss expects torch tensors")
    if p.dim() != 2 or p.shape != q.shape:
        raise ValueError(f"p and q must both be (B, bins) tensors, got {tuple(p.shape)} and {tuple(q.shape)}")


def emd_loss(p: torch.Tensor, q: torch.Tensor, r: float = 2) -> torch.Tensor:
    """Differentiable NIMA EMD: per image (mean_k |CDF_p - CDF_q|^r)^(1/r), mean over the batch."""
    if r <= 0:
        raise ValueError(f"emd_loss: r must be > 0, got {r}")
    _torch_distribution_pair(p, q)
    import torch

    diff = torch.abs(torch.cumsum(p, dim=1) - torch.cumsum(q, dim=1))
    per_image = _safe_root(torch.mean(diff ** r, dim=1), r)
    return per_image.mean()


def emd_loss_reference(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The reference TANet r=2 training loss: sqrt(mean over batch AND bins of (CDF_p - CDF_q)^2).

    Reference quirk: the root is taken once over the whole batch, not per image, so this is
    NOT the NIMA EMD of `emd_loss(p, q, r=2)` (which takes the root per image, then averages).
    For one image the two agree.
    """
    _torch_distribution_pair(p, q)
    import torch

    diff = torch.cumsum(p, dim=1) - torch.cumsum(q, dim=1)
    return _safe_root(torch.mean(diff ** 2), 2)


def distribution_mean(p: Any) -> Any:
    """Mean score sum_k k * p_k (k = 1..10) along the last axis; torch in -> torch out, else numpy
    (without importing torch)."""
    if _is_tensor(p):
        import torch

        if p.shape[-1:] != (NUM_BINS,):
            raise ValueError(f"distribution_mean: last dimension must be {NUM_BINS}, got shape {tuple(p.shape)}")
        x = p if p.is_floating_point() else p.float()
        k = torch.arange(1, NUM_BINS + 1, dtype=x.dtype, device=x.device)
        return (x * k).sum(dim=-1)
    a = _as_array(p, "p")
    if a.shape[-1:] != (NUM_BINS,):
        raise ValueError(f"distribution_mean: last dimension must be {NUM_BINS}, got shape {a.shape}")
    return a @ np.arange(1, NUM_BINS + 1, dtype=np.float64)


def distribution_std(p: Any) -> Any:
    """Standard deviation sqrt(sum_k p_k (k - mean)^2) (k = 1..10) along the last axis."""
    mean = distribution_mean(p)
    if _is_tensor(p):
        import torch

        x = p if p.is_floating_point() else p.float()
        k = torch.arange(1, NUM_BINS + 1, dtype=x.dtype, device=x.device)
        return torch.sqrt((x * (k - mean.unsqueeze(-1)) ** 2).sum(dim=-1))
    a = _as_array(p, "p")
    k = np.arange(1, NUM_BINS + 1, dtype=np.float64)
    return np.sqrt((a * (k - np.expand_dims(mean, -1)) ** 2).sum(axis=-1))


def srcc_accuracy_ratio(srcc_value: float, accuracy_value: float) -> float:
    """SRCC / accuracy (a paper metric for AVA); NaN when either is NaN or accuracy is 0."""
    s, a = float(srcc_value), float(accuracy_value)
    if math.isnan(s) or math.isnan(a):
        return float("nan")
    if a == 0:
        return _warn_nan("SRCC/accuracy ratio", "accuracy is 0")
    return s / a


def _is_blank_theme(theme: Any) -> bool:
    if theme is None:
        return True
    if isinstance(theme, float) and math.isnan(theme):  # empty CSV cell read by pandas
        return True
    return str(theme).strip() == ""


def per_theme_metrics(pred: Any, true: Any, themes: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """Per theme {"srcc", "plcc", "n"}, sorted by theme name; undefined ones are NaN with one warning per theme
    and the reason as "undefined"."""
    p, t = _score_pair(pred, true)
    theme_list = [str(x) for x in (themes.tolist() if hasattr(themes, "tolist") else themes)]
    if len(theme_list) != p.size:
        raise ValueError(f"themes has {len(theme_list)} entries but there are {p.size} scores")
    groups: dict[str, list[int]] = {}
    for i, theme in enumerate(theme_list):
        groups.setdefault(theme, []).append(i)
    result: dict[str, dict[str, Any]] = {}
    for theme in sorted(groups):
        idx = np.asarray(groups[theme])
        tp, tt = p[idx], t[idx]
        reason = correlation_undefined(tp, tt)
        if reason:
            warnings.warn(f"SRCC/PLCC of theme {theme!r} are undefined ({reason}); returning NaN",
                          RuntimeWarning, stacklevel=2)
            s = c = float("nan")
        else:
            s, c = _srcc(tp, tt), _plcc(tp, tt)
        result[theme] = {"srcc": s, "plcc": c, "n": int(idx.size), **({"undefined": reason} if reason else {})}
    return result


def evaluation_metrics(pred: Any, true: Any, *, threshold: float, pred_dist: Any = None,
                       true_dist: Any = None, themes: Sequence[Any] | None = None) -> dict[str, Any]:
    """All test metrics as plain JSON-serialisable Python numbers (NaN stays NaN).

    Always: srcc, plcc, accuracy, mse, n_images. With pred_dist and true_dist: emd (r=1) and
    srcc_accuracy_ratio. With themes: per_theme (blank themes are left out).
    """
    p, t = _score_pair(pred, true)
    out: dict[str, Any] = {
        "srcc": srcc(p, t),
        "plcc": plcc(p, t),
        "accuracy": accuracy(p, t, threshold=threshold),
        "mse": mse(p, t),
        "n_images": int(p.size),
    }
    if (pred_dist is None) != (true_dist is None):
        raise ValueError("evaluation_metrics: give both pred_dist and true_dist, or neither")
    if pred_dist is not None:
        a, b = _distribution_pair(pred_dist, true_dist)
        if a.shape[0] != p.size:
            raise ValueError(f"pred_dist has {a.shape[0]} rows but there are {p.size} scores")
        out["emd"] = emd(a, b, r=1)
        out["srcc_accuracy_ratio"] = srcc_accuracy_ratio(out["srcc"], out["accuracy"])
    if themes is not None:
        theme_list = list(themes.tolist() if hasattr(themes, "tolist") else themes)
        if len(theme_list) != p.size:
            raise ValueError(f"themes has {len(theme_list)} entries but there are {p.size} scores")
        keep = [i for i, th in enumerate(theme_list) if not _is_blank_theme(th)]
        out["per_theme"] = per_theme_metrics(p[keep], t[keep], [theme_list[i] for i in keep])
    return out
