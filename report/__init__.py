"""The analysis report of a trained TANet: PNG figures, one self-contained HTML page and the same
figures in TensorBoard, from a finished run folder or from a checkpoint plus a data split.

    python -m report runs/demo-20250101-120000                      # a finished run folder
    python -m report --checkpoint best.pth --dataset demo --out DIR  # a checkpoint on a test split

The library is ``build`` (re-exported here), the web page's figure ``attention``, the command line
``__main__``.
"""
from __future__ import annotations

from .build import Report, write_report, write_split_report
from .report_error import ReportError
from .page import render_html
from .predictions import PREDICTION_COLUMNS, PREDICTIONS_CSV, read_predictions, write_predictions
from .stats import hidden_counts, spread, theme_rows

__all__ = ["Report", "ReportError", "write_report", "write_split_report", "read_predictions", "write_predictions",
           "PREDICTION_COLUMNS", "PREDICTIONS_CSV", "theme_rows", "hidden_counts",
           "spread", "render_html"]
