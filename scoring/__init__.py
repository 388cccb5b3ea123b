"""Score your own images with a trained TANet: find the images (``inputs``), score them batch by batch
(``scorer``), and rank and write the per-image results (``results``, ``result_log``).

``predict.py`` is the command line on top of this package; the names below are its public API.
"""
from __future__ import annotations

from scoring.errors import ScoringError, ScoringWarning
from scoring.inputs import (
    LIST_SUFFIXES,
    RefusedImage,
    collect_images,
    image_extensions,
    images_in_csv_list,
    images_in_text_list,
    parse_shard,
    scan_folder,
    shard_of,
)
from scoring.result_log import ResultLog
from scoring.results import (
    OUTPUT_FORMATS,
    SORT_ORDERS,
    ScoreResult,
    check_output_path,
    output_columns,
    printable_name,
    rank_results,
    ranks,
    result_rows,
    write_csv_rows,
    write_results,
)
from scoring.scorer import BATCH_FUSION_WARNING, NO_WEIGHTS_HELP, ImageSource, Scorer

__all__ = [
    "BATCH_FUSION_WARNING", "LIST_SUFFIXES", "NO_WEIGHTS_HELP", "OUTPUT_FORMATS", "SORT_ORDERS", "ImageSource",
    "RefusedImage", "ResultLog", "ScoreResult", "Scorer", "ScoringError", "ScoringWarning", "check_output_path",
    "collect_images", "image_extensions", "images_in_csv_list", "images_in_text_list", "output_columns",
    "parse_shard", "printable_name", "rank_results", "ranks", "result_rows", "scan_folder", "shard_of",
    "write_csv_rows", "write_results",
]
