"""An output file that grows as images are scored, in input order, survives a kill and resumes
(``ResultLog``).

No torch here.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from scoring.errors import ScoringError
from scoring.results import (
    ScoreResult, json_line, write_rows, check_output_path, csv_cells, csv_row, output_columns,
    printable_name, result_from_row, result_row,
)
from helpers.safe_io import atomic_save_json


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
            self._file.write(json_line(row))
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
            write_rows(rows, f, self.format, self.variant)
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
