"""FLICKR-AES (Ren et al., ICCV 2017): its per-worker ratings, the list of test workers, and the splits
built from them: the generic model's (images rated by training workers only, each image's target its
mean over those workers) and the test workers' images.

The data set's published files are ``FLICKR-AES_image_labeled_by_each_worker.csv`` (``worker, imagePair,
score``: one rating 1..5 per row, a space after each comma) and ``FLICKR-AES_image_score.txt`` (each
image's mean score). Only the first is read: every target comes from the per-worker ratings, because the
generic model's target must leave the test workers' ratings out, and a mean over all raters does not.
Ratings 1..5 are mapped onto the project's 1..10 scale as ``--score_range 1 5`` maps a CSV's scores.
"""
from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from helpers.console import clip
from imagedata.images import DataError
from dataset import (
    ImageTableDataset,
    build_transform,
    carve_validation,
    check_csv_header,
    image_paths,
    read_bounded_text,
    rescale_scores,
    write_split_record,
)
from helpers.safe_io import sha256_file

RATINGS_CSV = "FLICKR-AES_image_labeled_by_each_worker.csv"
MEAN_SCORES_TXT = "FLICKR-AES_image_score.txt"  # published beside the ratings; not read (module docstring)
IMAGE_FOLDER = "40K"  # the published image folder's name, looked for inside --flickr_dir
RATING_COLUMNS = ("worker", "imagePair", "score")
RATING_SCALE = (1.0, 5.0)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _cell(value: str) -> str:
    return clip(repr(value), 80)


def _check_worker_id(worker: str, where: str) -> None:
    """DataError (``where``: the file and its row or line) for a worker id with spaces, commas or control
    characters: the ratings and the test-workers file take the same ids."""
    if re.search(r"[\s,]", worker) or _CONTROL.search(worker):
        raise DataError(f"{where}: worker {_cell(worker)} is not a worker id (it has spaces, commas or control "
                        f"characters)")


def to_1_10(scores: np.ndarray) -> np.ndarray:
    """Ratings (or their means) on 1..5 mapped onto 1..10: 1 + 9 (s - 1) / 4, as ``--score_range 1 5``."""
    return rescale_scores(scores, RATING_SCALE)


# --------------------------------------------------------------------------- reading

def _csv_rows(text: str, path: Path, what: str) -> tuple[list[str], list[list[str]]]:
    """(header, data rows) of CSV text, cells stripped, blank rows left out; DataError for bad CSV."""
    check_csv_header(text, path)
    try:
        rows = [[c.strip() for c in row] for row in csv.reader(io.StringIO(text))]
    except csv.Error as exc:
        raise DataError(f"{what} {path} is not a valid CSV: {exc}") from None
    rows = [row for row in rows if any(row)]
    if not rows:
        raise DataError(f"{what} {path} is empty (no header, no rows)")
    return rows[0], rows[1:]


def read_ratings(path: str | os.PathLike) -> pd.DataFrame:
    """The per-worker ratings CSV: columns ``worker``, ``image``, ``score`` (1..5, float) and ``row`` (the
    1-based data row), in file order.

    Reads the published format as it is (spaces after the commas, whitespace around cells) within the
    project's CSV limits. DataError naming the file and the row for a missing column or cell, a score
    that is not a whole number 1..5, a worker that rates the same image twice, or no rows at all.
    """
    path = Path(path)
    header, rows = _csv_rows(read_bounded_text(path, "ratings CSV"), path, "ratings CSV")
    missing = [c for c in RATING_COLUMNS if c not in header]
    if missing:
        raise DataError(f"ratings CSV {path}: missing column(s) {', '.join(missing)} (has "
                        f"{', '.join(_cell(c) for c in header[:10]) or 'none'}; expected {', '.join(RATING_COLUMNS)})")
    if not rows:
        raise DataError(f"ratings CSV {path} has a header but no ratings")
    col = {name: header.index(name) for name in RATING_COLUMNS}
    workers, images, scores = [], [], np.empty(len(rows), dtype=np.float64)
    first: dict[tuple[str, str], int] = {}
    low, high = RATING_SCALE
    for i, row in enumerate(rows):
        where = f"ratings CSV {path}: row {i + 1}"
        if len(row) != len(header):
            raise DataError(f"{where} has {len(row)} cells, the header {len(header)} ({', '.join(header)})")
        worker, image, score = (row[col[name]] for name in RATING_COLUMNS)
        for name, value in (("worker", worker), ("imagePair", image), ("score", score)):
            if not value:
                raise DataError(f"{where}: the {name} cell is empty")
            if _CONTROL.search(value):
                raise DataError(f"{where}: the {name} cell has control characters: {_cell(value)}")
        _check_worker_id(worker, where)
        try:
            value = float(score)
        except ValueError:
            raise DataError(f"{where} (worker {_cell(worker)}, image {_cell(image)}): score {_cell(score)} is not "
                            f"a number") from None
        if not (low <= value <= high and value == round(value)):
            raise DataError(f"{where} (worker {_cell(worker)}, image {_cell(image)}): score {_cell(score)} is not "
                            f"a rating of FLICKR-AES's scale (a whole number {low:g}..{high:g})")
        earlier = first.setdefault((worker, image), i + 1)
        if earlier != i + 1:
            raise DataError(f"{where}: worker {_cell(worker)} rates image {_cell(image)} a second time (first in "
                            f"row {earlier}); keep one rating per worker and image")
        workers.append(worker)
        images.append(image)
        scores[i] = value
    return pd.DataFrame({"worker": workers, "image": images, "score": scores,
                         "row": np.arange(1, len(rows) + 1)})


def read_test_workers(path: str | os.PathLike) -> list[str]:
    """The test workers listed in ``path``: one worker id per line (blank lines and ``#`` comments
    skipped), or a CSV with a ``worker`` column. DataError naming the file and the line or row for an
    empty or repeated id, or a file that lists none."""
    path = Path(path)
    text = read_bounded_text(path, "test-workers file")
    lines = [line.strip() for line in text.splitlines()]
    content = [(n, line) for n, line in enumerate(lines, start=1) if line and not line.startswith("#")]
    if not content:
        raise DataError(f"test-workers file {path} lists no workers (one worker id per line, or a CSV with a "
                        f"worker column)")
    first_cells = [c.strip() for c in next(csv.reader([content[0][1]]))]
    if "worker" in first_cells:  # a CSV from its header on (comment lines before it are skipped)
        header, rows = _csv_rows("\n".join(lines[content[0][0] - 1:]), path, "test-workers file")
        column = header.index("worker")
        entries = [(f"row {i}", row[column] if column < len(row) else "") for i, row in enumerate(rows, start=1)]
    else:
        entries = [(f"line {n}", line) for n, line in content]
    seen: dict[str, str] = {}
    for where, worker in entries:
        if not worker:
            raise DataError(f"test-workers file {path}: {where} has an empty worker id")
        _check_worker_id(worker, f"test-workers file {path}: {where}")
        if worker in seen:
            raise DataError(f"test-workers file {path}: {where} repeats worker {_cell(worker)} (first at "
                            f"{seen[worker]})")
        seen[worker] = where
    if not seen:
        raise DataError(f"test-workers file {path} lists no workers")
    return list(seen)


# --------------------------------------------------------------------------- the split by workers

@dataclass(frozen=True)
class WorkerSplit:
    """FLICKR-AES split by workers.

    ``generic``: the images no test worker rated, each with its mean over the training workers who rated it
    (``image``, ``score`` on 1..5, ``n_ratings``, ``row``: its first row in the ratings CSV), sorted by
    image. ``test``: the images some test worker rated, with the mean over all their raters. ``personal``:
    per test worker (in the list's order), its images sorted by name with its own ratings (1..5).
    """

    ratings_csv: Path
    test_workers: tuple[str, ...]
    training_workers: tuple[str, ...]
    generic: pd.DataFrame
    test: pd.DataFrame
    personal: Mapping[str, pd.DataFrame]


def _means(ratings: pd.DataFrame) -> pd.DataFrame:
    grouped = ratings.groupby("image", sort=True)
    return pd.DataFrame({"score": grouped["score"].mean(), "n_ratings": grouped["score"].size(),
                         "row": grouped["row"].min()}).reset_index()


def split_by_workers(ratings: pd.DataFrame, test_workers: Sequence[str], *, ratings_csv: str | os.PathLike,
                     test_workers_file: str | os.PathLike | None = None) -> WorkerSplit:
    """Split ``read_ratings``'s table by the test workers: no image a test worker rated is in the generic
    split. DataError when a listed test worker rated nothing, or when no training worker or no generic
    image is left."""
    listed = f"test-workers file {test_workers_file}" if test_workers_file is not None else "the test workers"
    known = set(ratings["worker"])
    absent = [w for w in test_workers if w not in known]
    if absent:
        raise DataError(f"{listed}: {len(absent)} of its {len(test_workers)} workers rated no image in {ratings_csv} "
                        f"(first: {', '.join(_cell(w) for w in absent[:5])}); is it the list of this data set?")
    is_test_worker = ratings["worker"].isin(set(test_workers))
    test_images = set(ratings.loc[is_test_worker, "image"])
    training = ratings[~is_test_worker & ~ratings["image"].isin(test_images)]
    training_workers = tuple(sorted(set(ratings.loc[~is_test_worker, "worker"])))
    if not training_workers or training.empty:
        raise DataError(f"{ratings_csv}: no image is rated by training workers alone ({len(test_workers)} test "
                        f"workers of {len(known)}); is {listed} the right list?")
    personal = {}
    for worker in test_workers:
        own = ratings[ratings["worker"] == worker].sort_values("image", kind="stable")
        personal[worker] = own[["image", "score", "row"]].reset_index(drop=True)
    return WorkerSplit(ratings_csv=Path(ratings_csv), test_workers=tuple(test_workers),
                       training_workers=training_workers, generic=_means(training),
                       test=_means(ratings[ratings["image"].isin(test_images)]), personal=personal)


def ratings_path(flickr_dir: str | os.PathLike) -> Path:
    """The per-worker ratings CSV in a FLICKR-AES folder; DataError when it is not there."""
    path = Path(flickr_dir) / RATINGS_CSV
    if not path.is_file():
        raise DataError(f"--flickr_dir {flickr_dir} holds no {RATINGS_CSV} (FLICKR-AES's per-worker ratings)")
    return path


def image_folder(flickr_dir: str | os.PathLike, image_dir: str | os.PathLike | None = None) -> Path:
    """``image_dir``, or else the ``40K`` folder of a FLICKR-AES folder; DataError when neither is there."""
    if image_dir is not None:
        return Path(image_dir)
    if (Path(flickr_dir) / IMAGE_FOLDER).is_dir():
        return Path(flickr_dir) / IMAGE_FOLDER
    raise DataError(f"--flickr_dir {flickr_dir} has no {IMAGE_FOLDER}/ image folder: pass --path_to_images, the "
                    f"folder of the FLICKR-AES images")


def load_split(flickr_dir: str | os.PathLike, test_workers: str | os.PathLike | None) -> WorkerSplit:
    """``split_by_workers`` of the ratings in ``flickr_dir`` and the test workers listed in ``test_workers``."""
    if test_workers is None:
        raise DataError("FLICKR-AES needs its test workers: pass --test_workers FILE, the 37 test workers of the "
                        "published split (one worker id per line, or a CSV with a worker column)")
    source = ratings_path(flickr_dir)
    return split_by_workers(read_ratings(source), read_test_workers(test_workers), ratings_csv=source,
                            test_workers_file=test_workers)


# --------------------------------------------------------------------------- datasets

class RatedImageDataset(ImageTableDataset):
    """Images with a score on 1..5 (a mean rating, or one worker's), mapped onto 1..10; target score / 10,
    shape (1,), as the ``tad66k`` variant trains. ``rows``: each image's first row in the ratings CSV."""

    def __init__(self, table: pd.DataFrame, source: Path, image_dir: str | os.PathLike, *, train: bool,
                 skip_bad: bool = False, allow_outside: bool = False, follow_symlinks: bool = False) -> None:
        names = table["image"].astype(str).tolist()
        rows = table["row"].astype(int).tolist()
        paths = image_paths(source, image_dir, names, allow_outside, follow_symlinks=follow_symlinks, rows=rows)
        scores = to_1_10(table["score"].to_numpy(dtype=np.float64))
        super().__init__(names=names, paths=paths, scores=scores, targets=(scores / 10.0)[:, None],
                         themes=[""] * len(names), transform=build_transform("tad66k", train), skip_bad=skip_bad,
                         source=source)
        self.rows = rows
        self.train = bool(train)
        self.transform_style = "tad66k"
        self.themed = False


def _split_info(split: WorkerSplit, test_workers_file: Path, fraction: float, seed: int) -> dict[str, Any]:
    return {"source_csv": str(split.ratings_csv), "source_sha256": sha256_file(split.ratings_csv),
            "test_workers_sha256": sha256_file(test_workers_file), "fraction": float(fraction), "seed": int(seed),
            "themes_sha256": None}


def build_flickr_datasets(flickr_dir: str | os.PathLike, test_workers: str | os.PathLike | None, *,
                          image_dir: str | os.PathLike | None = None, validation: str = "split",
                          val_fraction: float = 0.1, seed: int = 0, split_dir: str | os.PathLike | None = None,
                          skip_bad: bool = False, allow_outside: bool = False,
                          follow_symlinks: bool = False) -> dict[str, RatedImageDataset]:
    """{"train", "val", "test"} of FLICKR-AES for the generic model: train and val are carved (seeded,
    ``carve_validation``) from the images rated by training workers only, each scored by their mean; test
    is every image a test worker rated, scored by the mean over all its raters; ``validation="test"``: val
    is the test split. The carved split is recorded in ``split_dir`` when given (image, score on 1..5)."""
    if validation not in ("split", "test"):
        raise ValueError(f"validation must be 'split' or 'test', got {validation!r}")
    split = load_split(flickr_dir, test_workers)
    source, folder = split.ratings_csv, image_folder(flickr_dir, image_dir)
    common = dict(skip_bad=skip_bad, allow_outside=allow_outside, follow_symlinks=follow_symlinks)
    test = RatedImageDataset(split.test, source, folder, train=False, **common)
    full = RatedImageDataset(split.generic, source, folder, train=True, **common)
    if validation == "test":
        return {"train": full, "val": RatedImageDataset(split.test, source, folder, train=False, **common),
                "test": test}
    if len(full) < 2:
        raise DataError(f"{source}: {len(full)} image(s) rated by training workers alone; a validation split needs 2")
    is_val = carve_validation([""] * len(full), fraction=val_fraction, seed=seed)
    if split_dir is not None:
        write_split_record(source, is_val, split_dir, _split_info(split, Path(test_workers), val_fraction, seed),
                           rows=split.generic[["image", "score"]])
    return {"train": full.subset(~is_val), "val": full.subset(is_val, train=False), "test": test}
