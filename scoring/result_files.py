"""The results of a scoring run and their files: one image's result, ranking, the rows and the output
formats (.csv, .json, .jsonl, .parquet), an output that grows as images are scored and resumes after a
kill (``ResultLog``), and the shards of a collection.

No torch here (the standard library, presets' constants, safe_io's atomic writes; pyarrow for .parquet),
so a scorer without torch writes its results with it too.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import IO, Any, TextIO

from helpers.presets import NUM_BINS
from helpers.safe_io import atomic_save_json, atomic_write, csv_text_cell, csv_text_value, json_text

OUTPUT_FORMATS = (".csv", ".json", ".jsonl", ".parquet")
SORT_ORDERS = ("none", "desc", "asc")
SCALE_REQUIREMENTS = "requirements-scale.txt"


class ScoringError(ValueError):
    """Bad input to the scorer: weights, variant, option, image list or output (the message names it)."""


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
    """``image, score, error``; for ava ``image, score, std, p1..p10, error``."""
    extra = ["std", *(f"p{k}" for k in range(1, NUM_BINS + 1))] if variant == "ava" else []
    return ["image", "score", *extra, "error"]


def printable_name(name: str) -> str:
    """A file name as valid Unicode: bytes that are not UTF-8 (kept by Python as surrogates) become
    ``\\xNN`` escapes, so the name can be printed and written to UTF-8 files."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def result_row(r: ScoreResult, variant: str) -> dict[str, Any]:
    """One result as a dict of the ``output_columns``: None where there is no value, "" for no error."""
    row: dict[str, Any] = {"image": printable_name(r.image), "score": r.score}
    if variant == "ava":
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
    if variant == "ava" and number("p1") is not None:
        dist = tuple(number(f"p{k}") for k in range(1, NUM_BINS + 1))
    return ScoreResult(image=row["image"], score=number("score"), std=number("std") if variant == "ava" else None,
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


def _json_line(row: dict[str, Any]) -> str:
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


def _write_rows(rows: Iterable[dict[str, Any]], f: IO[Any], fmt: str, variant: str) -> None:
    """Rows in a format on an open binary file (as ``write_results`` writes them), streamed."""
    if fmt == ".parquet":
        _write_parquet(rows, f, variant)
        return
    text = io.TextIOWrapper(f, encoding="utf-8", newline="", write_through=False)
    if fmt == ".csv":
        write_csv_rows(rows, text, variant)
    elif fmt == ".jsonl":
        text.writelines(_json_line(row) for row in rows)
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
        _write_rows(rows, f, fmt, variant)


# --------------------------------------------------------------------------- growing files

def _complete_csv_rows(path: Path, columns: Sequence[str]) -> Iterator[tuple[int, list[str]]]:
    """(end offset, cells) of the header and each complete row of a CSV that a kill may have cut: the
    rows up to the first one that is cut (no line end, an open quote, missing cells). Streamed."""
    with open(path, "rb") as f:
        consumed = [0, b""]  # bytes given to the reader, the last line

        def feed() -> Iterator[str]:
            for line in f:  # lines end at b"\n" only; a quoted cell may span lines
                consumed[0] += len(line)
                consumed[1] = line
                yield line.decode("utf-8", "replace")

        header = True
        try:
            for cells in csv.reader(feed(), strict=True):
                if not consumed[1].endswith(b"\n") or len(cells) != len(columns):
                    return
                if header and cells != list(columns):
                    raise ScoringError(f"{path} does not start with the columns {','.join(columns)}; it was changed "
                                       f"since the run began: choose another --output")
                header = False
                yield consumed[0], cells
        except csv.Error:  # a quote left open by the cut
            return


def _complete_json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(end offset, row) of each complete line of a JSON Lines file that a kill may have cut."""
    offset = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.endswith(b"\n"):
                return
            try:
                row = json.loads(line)
            except ValueError:
                if f.read(1):
                    raise ScoringError(f"{path} line {number} is not a JSON object; it was changed since the run "
                                       f"began: choose another --output") from None
                return
            offset += len(line)
            yield offset, row


def inputs_digest(names: Iterable[str]) -> str:
    """SHA-1 of a run's image names in order: whether a resumed run scores the same collection."""
    h = hashlib.sha1()
    for name in names:
        h.update(printable_name(str(name)).encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


class ResultLog:
    """An output file that grows as images are scored, in input order, and survives a kill.

    Rows of .csv and .jsonl outputs are appended to the file itself (valid up to its last complete
    row at any moment); those of .json and .parquet to ``FILE.partial.jsonl``. ``FILE.resume.json``
    records the run (settings, the digest of its images) while it is unfinished; ``open(resume=True)``
    continues it after the rows already written, a cut last row dropped. ``finish`` writes the final
    file (ranked as asked) atomically and removes the run's other files.
    """

    def __init__(self, path: str | os.PathLike, variant: str, *, flush_rows: int = 32,
                 flush_seconds: float = 2.0) -> None:
        self.path = Path(path)
        self.format = check_output_path(path)
        self.variant = variant
        self.columns = output_columns(variant)
        self.in_place = self.format in (".csv", ".jsonl")
        self.rows_path = self.path if self.in_place else partial_rows_path(self.path)
        self.state_path = resume_state_path(self.path)
        self.final_temp = self.path.with_name(f".{self.path.name}.final.tmp")
        self.flush_rows, self.flush_seconds = flush_rows, flush_seconds
        self.done = 0  # rows in the file
        self.complete = False  # a stopped run had written its final file already
        self._file: TextIO | None = None
        self._writer: Any = None
        self._pending = 0
        self._flushed_at = time.monotonic()
        self._state: dict[str, Any] = {}

    # ---- starting

    @staticmethod
    def refuse_unfinished(path: str | os.PathLike, command: str) -> None:
        """ScoringError when ``path`` holds an unfinished run: it is continued with ``command``, never overwritten."""
        state = resume_state_path(Path(path))
        if state.exists():
            raise ScoringError(f"--output {path} holds a run that did not finish; continue it with: {command}  "
                               f"(or delete {state} to start again)")

    def open(self, *, settings: dict[str, Any], images: Sequence[str], resume: bool) -> int:
        """Start the file, or with ``resume`` continue the unfinished run in it (same ``settings`` and images,
        else ScoringError); returns the number of images already scored (the first ones of ``images``)."""
        state = {"format": self.format, "variant": self.variant, "columns": self.columns, "settings": settings,
                 "images": len(images), "inputs_sha1": inputs_digest(images), "finishing": False}
        if resume and self.state_path.exists():
            self._resume(state)
        else:
            self._start(state)
        return self.done

    def _start(self, state: dict[str, Any]) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.final_temp.unlink()
        self.rows_path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.rows_path, "w", encoding="utf-8", newline="")  # noqa: SIM115 - kept open
        if self.format == ".csv":
            self._writer = csv.writer(self._file, lineterminator="\n")
            self._writer.writerow(self.columns)
        self._sync()
        self._state = state
        atomic_save_json(state, self.state_path)  # after the rows file: a kill before leaves no run to resume

    def _resume(self, state: dict[str, Any]) -> None:
        try:
            old = json.loads(self.state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ScoringError(f"{self.state_path} cannot be read ({exc}); delete it to start again") from None
        changed = [key for key in ("format", "variant", "columns") if old.get(key) != state[key]]
        changed += [f"{key} ({old.get('settings', {}).get(key)!r} then, {value!r} now)"
                    for key, value in state["settings"].items() if old.get("settings", {}).get(key) != value]
        if old.get("images") != state["images"] or old.get("inputs_sha1") != state["inputs_sha1"]:
            changed.append(f"the images ({old.get('images')} then, {state['images']} now, or other names)")
        if changed:
            raise ScoringError(f"--resume: the unfinished run in {self.path} was started with other settings: "
                               f"{'; '.join(changed)}; resume with the same options and inputs, or choose another "
                               f"--output")
        self._state = old
        if old.get("finishing"):  # stopped while writing the final file
            if self.final_temp.exists():
                os.replace(self.final_temp, self.path)
            self._clean_up()
            self.complete = True
            self.done = state["images"]
            return
        if not self.rows_path.exists():
            raise ScoringError(f"--resume: {self.rows_path} is missing; delete {self.state_path} to start again")
        end, rows = 0, (-1 if self.format == ".csv" else 0)  # a CSV's header is no image
        for end, _ in self._complete_rows():
            rows += 1
        self.done = max(rows, 0)
        if self.done > state["images"]:
            raise ScoringError(f"--resume: {self.rows_path} holds {self.done} rows for {state['images']} images; "
                               f"it was changed since the run began: choose another --output")
        if self.format == ".csv" and end == 0:  # not even a whole header: write it again
            self._start(state)
            return
        self._file = open(self.rows_path, "r+", encoding="utf-8", newline="")  # noqa: SIM115 - kept open
        self._file.truncate(end)  # a row cut by the kill
        self._file.seek(end)
        if self.format == ".csv":
            self._writer = csv.writer(self._file, lineterminator="\n")
        self._sync()

    def _complete_rows(self) -> Iterator[tuple[int, Any]]:
        """(end offset, row) of the complete rows; for a CSV the header first."""
        if self.format == ".csv":
            return _complete_csv_rows(self.rows_path, self.columns)
        return _complete_json_lines(self.rows_path)

    # ---- writing

    def add(self, result: ScoreResult) -> None:
        """Append one result; the file is flushed and synced every ``flush_rows`` rows or ``flush_seconds``."""
        row = result_row(result, self.variant)
        if self._writer is not None:
            self._writer.writerow(csv_cells(row, self.columns))
        else:
            self._file.write(_json_line(row))
        self.done += 1
        self._pending += 1
        if self._pending >= self.flush_rows or time.monotonic() - self._flushed_at >= self.flush_seconds:
            self._sync()

    def _sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._pending = 0
        self._flushed_at = time.monotonic()

    def close(self) -> None:
        """Flush and close the rows file (the run stays resumable)."""
        if self._file is not None and not self._file.closed:
            self._sync()
            self._file.close()

    # ---- reading back and finishing

    def results(self) -> Iterator[ScoreResult]:
        """The results written so far, in input order (read back from the file)."""
        self.close()
        if self.complete:
            return
        rows = (row for _, row in self._complete_rows())
        if self.format == ".csv":
            next(rows, None)  # the header
            rows = (csv_row(cells, self.columns) for cells in rows)
        for row in rows:
            yield result_from_row(row, self.variant)

    def finish(self, ranked: Sequence[ScoreResult] | None = None) -> None:
        """Write the final file: the rows in input order, or ``ranked`` (``rank_results`` of them) when given;
        atomically, then remove the run's other files."""
        self.close()
        if self.complete:
            return
        if ranked is None and self.in_place:  # the rows file is the final file already
            self._clean_up()
            return
        rows = (result_row(r, self.variant) for r in (ranked if ranked is not None else self.results()))
        with open(self.final_temp, "wb") as f:
            _write_rows(rows, f, self.format, self.variant)
            f.flush()
            os.fsync(f.fileno())
        atomic_save_json({**self._state, "finishing": True}, self.state_path)
        os.replace(self.final_temp, self.path)
        self._clean_up()

    def _clean_up(self) -> None:
        if not self.in_place:
            with contextlib.suppress(FileNotFoundError):
                self.rows_path.unlink()
        with contextlib.suppress(FileNotFoundError):
            self.state_path.unlink()
        self.complete = True


def resume_state_path(path: Path) -> Path:
    """Where an unfinished run into ``path`` is recorded."""
    return path.with_name(path.name + ".resume.json")


def partial_rows_path(path: Path) -> Path:
    """Where the rows of an unfinished .json or .parquet output grow."""
    return path.with_name(path.name + ".partial.jsonl")


# --------------------------------------------------------------------------- shards

def parse_shard(text: str) -> tuple[int, int]:
    """``I/N`` (0 <= I < N) as (I, N); ValueError otherwise."""
    index, sep, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i, n = -1, 0
    if not sep or n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard must be I/N with 0 <= I < N (e.g. 0/4 ... 3/4), got {text!r}")
    return i, n


def shard_of(key: str | os.PathLike, count: int) -> int:
    """The shard (0..count-1) of an image by its path relative to its input folder or list (as POSIX):
    SHA-1 of it, so every machine and Python agrees."""
    name = PurePath(key).as_posix().encode("utf-8", "surrogateescape")
    return int.from_bytes(hashlib.sha1(name).digest()[:8], "big") % count
