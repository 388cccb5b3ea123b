"""What a request computes, off the event loop: the scores of uploaded files, the RGB-attention
figure of one, and results back into predict.py's CSV."""
from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from imagedata.images import DataError, PixelBudget, decode_image
from helpers.preprocessing import NUM_BINS
from models import get_pretrained_cfg
from report.attention import rgb_attention_png
from helpers.runtime import release_free_memory
from scoring import Scorer, ScoreResult, output_columns, result_rows, write_csv_rows

from .uploads import Upload

# An upload of more pixels is decoded reduced (images.decode_image): the model sees 224x224. Photos
# of up to 50 million pixels (8660x5773) are decoded exactly as predict.py decodes them.
REDUCE_ABOVE_PIXELS = 50_000_000
# After a request that decoded more pixels than this, the freed memory is given back to the system.
RELEASE_AFTER_PIXELS = 16_000_000


class AttentionUnavailable(Exception):
    """The RGB-attention figure needs the PyTorch model (not an ONNX export)."""


def has_attention(scorer: Scorer) -> bool:
    """Whether ``scorer`` can draw the RGB-attention figure (a PyTorch TANet; an ONNX export cannot)."""
    return isinstance(scorer.model, torch.nn.Module)


def prepare(scorer: Scorer, upload: Upload, budget: PixelBudget | None = None) -> Tensor:
    """An upload decoded from memory as ``load_image`` decodes files (reduced above REDUCE_ABOVE_PIXELS,
    its pixels charged to ``budget``), then the scorer's transform; DataError naming the file if it cannot be."""
    if upload.error is not None:
        raise DataError(upload.error)
    try:
        return scorer.transform(decode_image(upload.data, upload.name, reduce_above=REDUCE_ABOVE_PIXELS,
                                             budget=budget))
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - one bad image must not stop the others
        raise DataError(f"image file {upload.name} could not be prepared: {type(exc).__name__}: {exc}") from None


def _release_after(budget: PixelBudget) -> None:
    if budget.limit - budget.left > RELEASE_AFTER_PIXELS:
        release_free_memory()


def score_uploads(scorer: Scorer, uploads: Sequence[Upload], max_pixels: int | None = None) -> list[ScoreResult]:
    """One result per upload, in order; each file is decoded and transformed alone (its bytes then
    dropped), and the good ones are scored together by ``Scorer.score_detailed``. Files beyond
    ``max_pixels`` decoded pixels in all get an error."""
    tensors: list[Tensor] = []
    errors: dict[int, str] = {}
    budget = PixelBudget(max_pixels if max_pixels is not None else 1 << 62)
    try:
        for i, upload in enumerate(uploads):
            try:
                tensors.append(prepare(scorer, upload, budget))
            except DataError as exc:
                errors[i] = str(exc)
            upload.data = None
    finally:
        _release_after(budget)
    scored = iter(scorer.score_detailed(torch.stack(tensors)) if tensors else ())
    results = []
    for i, upload in enumerate(uploads):
        if i in errors:
            results.append(ScoreResult(image=upload.name, error=errors[i]))
            continue
        result = next(scored)
        error = result.error.replace(result.image, upload.name, 1) if result.error else None
        results.append(replace(result, image=upload.name, error=error))
    return results


def attention_png(scorer: Scorer, upload: Upload) -> bytes:
    """The report's RGB-attention figure of one upload (its input, 12x12 patch colours and their
    similarity), titled with its predicted score; DataError if the file cannot be decoded."""
    if not has_attention(scorer):
        raise AttentionUnavailable("the RGB-attention figure needs a PyTorch checkpoint (.pth); this server "
                                   "scores with an ONNX export, which has no attention maps")
    budget = PixelBudget(1 << 62)
    try:
        x = prepare(scorer, upload, budget)
    finally:
        upload.data = None
        _release_after(budget)
    result = scorer.score_detailed(x.unsqueeze(0))[0]
    return rgb_attention_png(scorer.model, x, upload.name, result.score, scorer.device)


def _number(row: dict, key: str, where: str) -> float | None:
    value = row.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: {key} must be a finite number or null, got {value!r}")
    return float(value)


def results_from_rows(rows: Any, variant: str) -> list[ScoreResult]:
    """Rows as ``/api/score`` returns them back into ScoreResults; ValueError naming the bad row."""
    if not isinstance(rows, list):
        raise ValueError("expected a JSON list of result rows (the 'results' of /api/score)")
    columns = set(output_columns(variant))
    distribution = get_pretrained_cfg(variant).is_distribution
    results = []
    for n, row in enumerate(rows, start=1):
        where = f"row {n}"
        if not isinstance(row, dict):
            raise ValueError(f"{where} is not an object")
        unknown = sorted(set(row) - columns)
        if unknown:
            raise ValueError(f"{where} has fields that are not result columns: {', '.join(map(str, unknown))}")
        image, error = row.get("image"), row.get("error") or None
        if not isinstance(image, str) or not isinstance(error, (str, type(None))):
            raise ValueError(f"{where}: image must be a string and error a string or null")
        dist = None
        if distribution:
            bins = [_number(row, f"p{k}", where) for k in range(1, NUM_BINS + 1)]
            if any(b is None for b in bins) and not all(b is None for b in bins):
                raise ValueError(f"{where}: p1..p{NUM_BINS} must all be numbers or all null")
            dist = None if bins[0] is None else tuple(bins)
        results.append(ScoreResult(image=image, score=_number(row, "score", where),
                                   std=_number(row, "std", where) if distribution else None,
                                   distribution=dist, error=error))
    return results


def csv_text(results: Sequence[ScoreResult], variant: str) -> str:
    """The results as predict.py writes its CSV."""
    out = io.StringIO()
    write_csv_rows(result_rows(results, variant), out, variant)
    return out.getvalue()
