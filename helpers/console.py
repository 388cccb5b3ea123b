"""What reaches a terminal or a log: progress bars on a terminal and plain lines elsewhere,
user-supplied text with its control characters escaped, errors on one line of bounded length.

A bottom-layer helper: it imports nothing of ours.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import IO, Any

__all__ = ["safe_text", "clip", "one_line", "SafeFormatter", "progress", "is_terminal", "warnings_as_lines",
           "write_line"]

MAX_MESSAGE = 1000  # characters of an error line
LINE_EVERY = 10  # percent of a long loop between two progress lines in a log ...
LINE_SECONDS = 10.0  # ... and at least this many seconds


def safe_text(text: Any) -> str:
    """``text`` with every character that is not printable (terminal escape sequences, other control
    characters, undecodable bytes kept as surrogates, bidirectional overrides) written as ``repr``
    writes it (``\\x1b``, ``\\udcff``, ``\\u202e``); everything else as it is."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


def clip(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def one_line(exc: BaseException, limit: int = MAX_MESSAGE) -> str:
    """An error's message on one escaped line of at most ``limit`` characters; for an error re-raised
    from a DataLoader worker (its message holds the worker's traceback), the original message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    if len(lines) > 1 and lines[0].startswith("Caught ") and lines[1].startswith("Original Traceback"):
        lines = [lines[-1].split(": ", 1)[-1]]
    return clip(safe_text(" ".join(lines)), limit)


class SafeFormatter(logging.Formatter):
    """A log formatter whose lines carry no control characters (file names from users are data)."""

    def format(self, record: logging.LogRecord) -> str:
        return safe_text(super().format(record))


@contextlib.contextmanager
def warnings_as_lines(prog: str, always: type[Warning] | None = None) -> Iterator[None]:
    """Within the block, a warning prints as one escaped line ``PROG: warning: ...`` on standard error
    (no file and line of the code); those of the category ``always`` every time they occur."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        print(f"{prog}: warning: {safe_text(message)}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        if always is not None:
            warnings.simplefilter("always", always)
        yield


def is_terminal(stream: IO[str] | None = None) -> bool:
    """Whether ``stream`` (default: standard error) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _LineProgress:
    """tqdm's interface for a log: a plain line at the end, and on a long loop one every
    ``LINE_EVERY`` percent that comes ``LINE_SECONDS`` after the last; no carriage returns."""

    def __init__(self, iterable: Iterable | None, total: int | None, desc: str, unit: str, stream: IO[str],
                 initial: int = 0, silent: bool = False) -> None:
        self.iterable, self.desc, self.unit, self.stream, self.silent = iterable, desc, unit, stream, silent
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.postfix = total, initial, ""
        self._start_n = initial
        self._next_percent, self._started = LINE_EVERY, time.monotonic()
        self._last_line = self._started

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> "_LineProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.total:
            percent = 100 * self.n // self.total
            if percent >= self._next_percent and self.n < self.total:
                self._next_percent = (percent // LINE_EVERY + 1) * LINE_EVERY
                if time.monotonic() - self._last_line >= LINE_SECONDS:
                    self._line()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def close(self) -> None:
        if self._started is not None and self.n > self._start_n:
            self._line()
        self._started = None

    def _line(self) -> None:
        if self.silent:
            return
        self._last_line = time.monotonic()
        seconds = self._last_line - (self._started or self._last_line)
        of = f"/{self.total}" if self.total else ""
        share = f" ({100 * self.n // self.total}%)" if self.total else ""
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.n}{of} {self.unit}{share}, {seconds:.0f} s{extra}", file=self.stream, flush=True)


def progress(iterable: Iterable | None = None, *, desc: str, total: int | None = None, unit: str = "it",
             enabled: bool = True, initial: int = 0, stream: IO[str] | None = None, **bar_options: Any) -> Any:
    """A progress bar (tqdm) on a terminal; in a log or pipe, a plain line at the end and every few
    percent of a long loop; nothing when not ``enabled``. Iterate over it, or use it as a context
    manager with ``update(n)``. ``bar_options`` go to tqdm (``unit_scale=True``, ...)."""
    out = sys.stderr if stream is None else stream
    if not enabled or not is_terminal(out):  # tqdm is imported for a bar only (it takes a tenth of a second)
        return _LineProgress(iterable, total, desc, unit, out, initial, silent=not enabled)
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=False, dynamic_ncols=True,
                file=out, **bar_options)


def write_line(text: str, file: IO[str] | None = None) -> None:
    """Print ``text`` on a line of its own, above a progress bar when one is on the terminal."""
    tqdm = sys.modules.get("tqdm")  # no bar was shown unless tqdm was imported
    if tqdm is not None:
        tqdm.tqdm.write(text, file=file)
    else:
        print(text, file=sys.stdout if file is None else file)
