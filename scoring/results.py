"""The results of a scoring run: one image's result, ranking, the output rows and the formats of a whole
file (.csv, .json, .jsonl, .parquet).

No torch here (the standard library, the model registry's facts, safe_io's atomic writes; pyarrow for .parquet),
so a scorer without torch writes its results with it too.
"""
from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TextIO

from helpers.preprocessing import NUM_BINS
from models.registry import get_pretrained_cfg
from scoring.errors import ScoringError
from helpers.safe_io import atomic_save_json, atomic_write, csv_text_cell, csv_text_value, json_text

OUTPUT_FORMATS = (".csv", ".json", ".jsonl", ".parquet")
SORT_ORDERS = ("none", "desc", "asc")
SCALE_REQUIREMENTS = "requirements-scale.txt"


@dataclass(frozen=True)
class ScoreResult:
    """One image's result: ``score`` on 1..10 (None if it failed); for ava also the ``std`` and
    the ten-bin ``distribution`` over the scores 1..10; ``error`` says why it failed (None if fine)."""

    image: str
    score: float | None = None
    std: float | None = None
    distribution: tuple[float, ...] | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


# --------------------------------------------------------------------------- ranking

def rank_results(
    results: Sequence[ScoreResult],
    *,
    sort: str | None = None,
    top: int | None = None,
    bottom: int | None = None,
) -> list[ScoreResult]:
    """The results to report. ``top``/``bottom`` N: the N highest / lowest scores (failed images
    left out), best-first / worst-first unless ``sort`` says otherwise. Else every result, in
    input order (``sort`` None or "none") or by score with the failed ones last. Ties keep input order."""
    if sort is not None and sort not in SORT_ORDERS:
        raise ScoringError(f"sort must be one of {SORT_ORDERS}, got {sort!r}")
    if top is not None and bottom is not None:
        raise ScoringError("give top or bottom, not both")
    for name, n in (("top", top), ("bottom", bottom)):
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ScoringError(f"{name} must be a positive integer, got {n!r}")
    scored = [r for r in results if r.error is None]
    by_score = sorted(scored, key=lambda r: r.score)  # stable: ties keep input order
    if top is not None or bottom is not None:
        if top is not None:
            chosen = sorted(by_score, key=lambda r: -r.score)[:top]
        else:
            chosen = by_score[:bottom]
        order = sort or ("desc" if top is not None else "asc")
        if order == "none":
            keep = {id(r) for r in chosen}
            return [r for r in results if id(r) in keep]
        return sorted(chosen, key=lambda r: -r.score if order == "desc" else r.score)
    if sort in (None, "none"):
        return list(results)
    failed = [r for r in results if r.error is not None]
    return (sorted(scored, key=lambda r: -r.score) if sort == "desc" else by_score) + failed


def ranks(sort: str | None, top: int | None, bottom: int | None) -> bool:
    """Whether ``rank_results`` with these options reorders or drops results."""
    return sort not in (None, "none") or top is not None or bottom is not None


# --------------------------------------------------------------------------- rows

def output_columns(variant: str) -> list[str]:
    """``image, score, error``; for a distribution (ava) ``image, score, std, p1..p10, error``."""
    return list(get_pretrained_cfg(variant).result_columns)


def printable_name(name: str) -> str:
    """A file name as valid Unicode: bytes that are not UTF-8 (kept by Python as surrogates) become
    ``\\xNN`` escapes, so the name can be printed and written to UTF-8 files."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def result_row(r: ScoreResult, variant: str) -> dict[str, Any]:
    """One result as a dict of the ``output_columns``: None where there is no value, "" for no error."""
    row: dict[str, Any] = {"image": printable_name(r.image), "score": r.score}
    if get_pretrained_cfg(variant).is_distribution:
        row["std"] = r.std
        dist = r.distribution or (None,) * NUM_BINS
        row.update({f"p{k}": v for k, v in zip(range(1, NUM_BINS + 1), dist)})
    row["error"] = r.error or ""
    return row


def result_rows(results: Iterable[ScoreResult], variant: str) -> list[dict[str, Any]]:
    """``result_row`` of each result."""
    return [result_row(r, variant) for r in results]


def result_from_row(row: dict[str, Any], variant: str) -> ScoreResult:
    """The ScoreResult of a row as ``result_row`` gives it, or as read back from a CSV (strings; "" for none)."""
    def number(key: str) -> float | None:
        value = row.get(key)
        return None if value is None or value == "" else float(value)

    dist = None
    distribution = get_pretrained_cfg(variant).is_distribution
    if distribution and number("p1") is not None:
        dist = tuple(number(f"p{k}") for k in range(1, NUM_BINS + 1))
    return ScoreResult(image=row["image"], score=number("score"), std=number("std") if distribution else None,
                       distribution=dist, error=row.get("error") or None)


def csv_cells(row: dict[str, Any], columns: Sequence[str]) -> list[Any]:
    """A row's CSV cells in ``columns`` order: empty for missing values, the text cells (image, error)
    safe in a spreadsheet (``safe_io.csv_text_cell``)."""
    return ["" if row.get(c) is None else csv_text_cell(row[c]) if isinstance(row[c], str) else row[c]
            for c in columns]


def csv_row(cells: Sequence[str], columns: Sequence[str]) -> dict[str, str]:
    """The row of CSV cells that ``csv_cells`` wrote (text cells unescaped)."""
    return {c: csv_text_value(v) if c in ("image", "error") else v for c, v in zip(columns, cells)}


def write_csv_rows(rows: Iterable[dict[str, Any]], f: TextIO, variant: str) -> None:
    """``result_rows`` as CSV on an open text file: the ``output_columns`` header, then ``csv_cells``."""
    columns = output_columns(variant)
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(csv_cells(row, columns) for row in rows)


def json_line(row: dict[str, Any]) -> str:
    """A row as one line of JSON Lines."""
    return json_text(row, ensure_ascii=False) + "\n"


# --------------------------------------------------------------------------- whole files

def need_pyarrow(path: str | os.PathLike) -> Any:
    """pyarrow.parquet, or ScoringError saying how to install it."""
    try:
        import pyarrow.parquet as pq  # the optional extra of requirements-scale.txt
    except ImportError:
        raise ScoringError(f"--output {path}: writing .parquet needs pyarrow; install it with "
                           f"pip install -r {SCALE_REQUIREMENTS}") from None
    return pq


def check_output_path(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> str:
    """The format (``.csv``, ``.json``, ``.jsonl`` or ``.parquet``) of an output file name; ScoringError
    for another type, for .parquet without pyarrow, for a folder or a folder that cannot be written to,
    and for one of the ``inputs`` (an image list, an image): outputs never overwrite them."""
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise ScoringError(f"--output {path}: unknown file type {suffix or '(none)'!r}; use a .csv, .json, .jsonl "
                           f"or .parquet name")
    if suffix == ".parquet":
        need_pyarrow(path)
    if target.is_dir():
        raise ScoringError(f"--output {path} is a folder; name a .csv, .json, .jsonl or .parquet file")
    real = os.path.realpath(target)
    for given in inputs:
        if os.path.realpath(os.fspath(given)) == real:
            raise ScoringError(f"--output {path} is also an input ({given}); inputs are never overwritten: "
                               f"choose another file")
    parent = next((p for p in (target.parent, *target.parent.parents) if p.exists()), None)
    if parent is not None and (not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK)):
        raise ScoringError(f"--output {path}: cannot write into {parent}; choose another place")
    return suffix


def write_rows(rows: Iterable[dict[str, Any]], f: IO[Any], fmt: str, variant: str) -> None:
    """Rows in a format on an open binary file (as ``write_results`` writes them), streamed."""
    if fmt == ".parquet":
        _write_parquet(rows, f, variant)
        return
    text = io.TextIOWrapper(f, encoding="utf-8", newline="", write_through=False)
    if fmt == ".csv":
        write_csv_rows(rows, text, variant)
    elif fmt == ".jsonl":
        text.writelines(json_line(row) for row in rows)
    else:  # as atomic_save_json writes a list (indent 2), one row at a time
        first = True
        for row in rows:
            item = json_text(row, indent=2).replace("\n", "\n  ")
            text.write(("[\n  " if first else ",\n  ") + item)
            first = False
        text.write("[]\n" if first else "\n]\n")
    text.flush()
    text.detach()


def _write_parquet(rows: Iterable[dict[str, Any]], f: IO[bytes], variant: str, chunk: int = 8192) -> None:
    pq = need_pyarrow(getattr(f, "name", "output.parquet"))
    import pyarrow as pa

    columns = output_columns(variant)
    schema = pa.schema([(c, pa.string() if c in ("image", "error") else pa.float64()) for c in columns])
    with pq.ParquetWriter(f, schema) as writer:
        batch: list[dict[str, Any]] = []
        for row in rows:
            batch.append(row)
            if len(batch) == chunk:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                batch = []
        if batch:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))


def write_results(results: Iterable[ScoreResult], path: str | os.PathLike, variant: str) -> None:
    """Write results atomically, by the file's extension: CSV (empty cells for missing values), JSON (a
    list of row objects, null for missing values), JSON Lines (one row object a line) or Parquet."""
    fmt = check_output_path(path)
    rows = (result_row(r, variant) for r in results)
    if fmt == ".json":
        atomic_save_json(list(rows), path)
        return
    with atomic_write(path, "wb") as f:
        write_rows(rows, f, fmt, variant)
