"""Check the images of a split before training: that every file exists and, by default, that it
decodes, so a broken test image stops the run before the first epoch instead of after the last.

Decoding uses every core and is remembered per file (path, size and modification time) in a small
SQLite file, so checking the same images again is instant.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from helpers.console import progress as progress_bar
from dataset import ImageTableDataset
from imagedata.images import DataError, load_image
from helpers.runtime import usable_cpus
from helpers.safe_io import atomic_write

logger = logging.getLogger(__name__)

CHECK_MODES = ("decode", "exists", "none")
CACHE_ENV = "TANET_CACHE_DIR"
CACHE_FILE = "image_checks.sqlite"
IN_PROCESS_BELOW = 64  # images to decode: fewer are decoded here, not in worker processes
_MAX_LISTED = 5


def default_cache_path() -> Path:
    """``$TANET_CACHE_DIR/image_checks.sqlite``, else under ``$XDG_CACHE_HOME`` or ``~/.cache``, in ``tanet/``."""
    folder = os.environ.get(CACHE_ENV)
    if not folder:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        folder = os.path.join(base, "tanet")
    return Path(folder) / CACHE_FILE


def _decode(path: str) -> str | None:
    """None if the image decodes as training would decode it, else why not."""
    try:
        load_image(path)
    except DataError as exc:
        return str(exc)
    return None


class _CheckCache:
    """Known results per (path, size, mtime); unusable (read-only, corrupt) means no cache, with a note."""

    def __init__(self, path: Path | None) -> None:
        self.db: sqlite3.Connection | None = None
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(path, timeout=30)
            self.db.execute("CREATE TABLE IF NOT EXISTS checks (path TEXT PRIMARY KEY, size INTEGER, "
                            "mtime_ns INTEGER, error TEXT)")
        except (OSError, sqlite3.Error) as exc:
            logger.warning("image check cache %s not used (%s): every image is decoded", path, exc)
            self.db = None

    def known(self, keys: Sequence[tuple[str, int, int]]) -> dict[str, str | None]:
        if self.db is None:
            return {}
        found: dict[str, str | None] = {}
        try:
            for start in range(0, len(keys), 500):
                part = {k[0]: k for k in keys[start:start + 500]}
                marks = ",".join("?" * len(part))
                rows = self.db.execute(f"SELECT path, size, mtime_ns, error FROM checks WHERE path IN ({marks})",
                                       list(part))
                for path, size, mtime, error in rows:
                    if part[path][1:] == (size, mtime):
                        found[path] = error
        except sqlite3.Error as exc:
            logger.warning("image check cache unreadable (%s): every image is decoded", exc)
            return {}
        return found

    def store(self, results: Sequence[tuple[str, int, int, str | None]]) -> None:
        if self.db is None or not results:
            return
        try:
            with self.db:
                self.db.executemany("INSERT OR REPLACE INTO checks VALUES (?, ?, ?, ?)", results)
        except sqlite3.Error as exc:
            logger.warning("image check cache not updated (%s)", exc)

    def close(self) -> None:
        if self.db is not None:
            self.db.close()


def _file_key(path: str) -> tuple[str, int, int]:
    st = os.stat(path)
    return os.path.realpath(path), st.st_size, st.st_mtime_ns


def _decode_all(paths: list[str], workers: int, show: bool, desc: str) -> Iterator[tuple[int, str | None]]:
    """(index in paths, error or None) for every path, in any order."""
    with progress_bar(total=len(paths), desc=desc, unit="img", enabled=show) as bar:
        if workers <= 1 or len(paths) < IN_PROCESS_BELOW:
            for i, path in enumerate(paths):
                yield i, _decode(path)
                bar.update(1)
            return
        chunk = max(1, min(64, len(paths) // (workers * 8)))
        context = multiprocessing.get_context("spawn")  # forking a process that may run threads can deadlock
        with context.Pool(workers, initializer=_ignore_interrupts) as pool:
            for i, error in pool.imap_unordered(_indexed_decode, enumerate(paths), chunksize=chunk):
                yield i, error
                bar.update(1)


def _ignore_interrupts() -> None:
    """Ctrl-C is for the main process, which stops the pool (no traceback from every worker)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _indexed_decode(job: tuple[int, str]) -> tuple[int, str | None]:
    return job[0], _decode(job[1])


def _listed(dataset: ImageTableDataset, rows: Sequence[int], why: Sequence[str] | None = None) -> str:
    parts = []
    for k, i in enumerate(rows[:_MAX_LISTED]):
        reason = f": {why[k]}" if why is not None else ""
        parts.append(f"{dataset.names[i]!r} (row {dataset.rows[i]}){reason}")
    return "; ".join(parts) + ("; ..." if len(rows) > _MAX_LISTED else "")


def _write_list(path: Path | None, lines: Sequence[str]) -> None:
    if path is not None:
        with atomic_write(path, "w") as f:
            f.write("".join(f"{line}\n" for line in lines))


def check_images(dataset: ImageTableDataset, *, mode: str = "decode", split: str = "train",
                 skip_missing: bool = False, skip_bad: bool = False, log_dir: str | os.PathLike | None = None,
                 workers: int | None = None, cache: str | os.PathLike | None | bool = True,
                 progress: bool = False, offer_skip: bool = True) -> ImageTableDataset:
    """Check a split's images; returns the dataset.

    ``mode`` "exists": every file exists; "decode" (the default) also decodes each one as training
    would; "none": nothing. Missing files stop the run (``DataError`` naming the CSV, the rows and
    the option that gets past it) unless ``skip_missing``; undecodable ones unless ``skip_bad``. Skipped
    images are dropped from the dataset (in place) and listed in ``log_dir/{missing,bad}_images_<split>.txt``.
    ``cache``: True for the default cache file, a path, or None/False for none. ``offer_skip``: the
    messages suggest --skip_missing and --skip_bad (False for a command that has no such options).
    """
    if mode not in CHECK_MODES:
        raise ValueError(f"--check_images must be one of {', '.join(CHECK_MODES)}, got {mode!r}")
    if mode == "none" or len(dataset) == 0:
        return dataset
    folder = Path(log_dir) if log_dir is not None else None
    missing = np.array([not os.path.isfile(p) for p in dataset.paths], dtype=bool)
    if missing.any():
        rows = np.flatnonzero(missing).tolist()
        where = f"{len(rows)} of {len(dataset)} images listed in {dataset.source} are missing"
        looked = os.path.dirname(dataset.paths[rows[0]])
        if len(rows) == len(dataset):
            raise DataError(f"{where}: all of them (first: {_listed(dataset, rows)}; looked in {looked}); "
                            f"check --path_to_images")
        if not skip_missing:
            raise DataError(f"{where} (first: {_listed(dataset, rows)}; looked in {looked}); check "
                            f"--path_to_images{', or pass --skip_missing to train without them' if offer_skip else ''}")
        log = folder / f"missing_images_{split}.txt" if folder is not None else None
        _write_list(log, [dataset.names[i] for i in rows])
        logger.warning("%s; skipping them (--skip_missing)%s", where, f", names in {log}" if log else "")
        dataset.keep(~missing)
    if mode == "exists":
        return dataset

    store = _CheckCache(default_cache_path() if cache is True else Path(cache) if cache else None)
    try:
        keys = [_file_key(p) for p in dataset.paths]
        errors: dict[int, str | None] = {}
        known = store.known(keys)
        todo = []
        for i, key in enumerate(keys):
            if key[0] in known:
                errors[i] = known[key[0]]
            else:
                todo.append(i)
        if todo:
            count = usable_cpus() if workers is None else workers
            decoded = []
            for j, error in _decode_all([dataset.paths[i] for i in todo], count, progress, f"check {split}"):
                errors[todo[j]] = error
                decoded.append((*keys[todo[j]], error))
                if len(decoded) >= 1000:
                    store.store(decoded)
                    decoded = []
            store.store(decoded)
    finally:
        store.close()
    bad = sorted(i for i, error in errors.items() if error is not None)
    if not bad:
        return dataset
    why = [str(errors[i]) for i in bad]
    where = f"{len(bad)} of {len(dataset)} images listed in {dataset.source} cannot be decoded"
    if not skip_bad or len(bad) == len(dataset):
        skip = "pass --skip_bad to train without them, " if offer_skip else ""
        raise DataError(f"{where} (first: {_listed(dataset, bad, why)}); replace or remove them, {skip}or pass "
                        f"--check_images exists to check only that the files exist")
    log = folder / f"bad_images_{split}.txt" if folder is not None else None
    _write_list(log, [f"{dataset.names[i]}\t{w}" for i, w in zip(bad, why)])
    logger.warning("%s; skipping them (--skip_bad)%s", where, f", listed in {log}" if log else "")
    keep = np.ones(len(dataset), dtype=bool)
    keep[bad] = False
    dataset.keep(keep)
    return dataset
