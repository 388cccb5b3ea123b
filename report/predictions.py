"""A run's ``test_predictions.csv``: one row per test image with its theme, true and predicted score
on 1..10. ``main_nni.py`` writes it; the report reads it."""
from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from helpers.safe_io import atomic_write, csv_text_cell, csv_text_value

from .report_error import ReportError
from .stats import ScoreTable

PREDICTIONS_CSV = "test_predictions.csv"
PREDICTION_COLUMNS = ("image", "theme", "true_score", "pred_score")


def write_predictions(path: Path, names: Sequence[str], themes: Sequence[str], true: np.ndarray,
                      pred: np.ndarray) -> None:
    """One row per image: its file name, theme, true and predicted score on 1..10; written atomically,
    the name and theme safe in a spreadsheet (``safe_io.csv_text_cell``; ``read_predictions`` undoes it)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(PREDICTION_COLUMNS)
    for name, theme, t, p in zip(names, themes, true, pred):
        writer.writerow([csv_text_cell(Path(name).name), csv_text_cell(str(theme)), f"{t:.6f}", f"{p:.6f}"])
    with atomic_write(path, "w") as f:
        f.write(buf.getvalue())


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
    return ScoreTable([csv_text_value(n) for n in df["image"]], [csv_text_value(t) for t in df["theme"]],
                      scores["true_score"], scores["pred_score"])


