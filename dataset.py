"""The data sets of TANet: CSV readers with limits and validation, the reference's transforms,
TAD66K-format and AVA datasets, and the validation split. Images themselves: ``images.py``."""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import logging
import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, default_collate

from imagedata.images import DataError, EvalTransform, Resize, link_leaves_folder, load_image
from helpers.preprocessing import IMAGENET_MEAN, IMAGENET_STD, TRANSFORMS
from helpers.safe_io import atomic_save_json, atomic_write, sha256_file

logger = logging.getLogger(__name__)

REPO_DIR = Path(__file__).resolve().parent
DEFAULT_TAD66K_DIR = REPO_DIR / "data" / "TAD66K"
DEFAULT_AVA_DIR = REPO_DIR / "data" / "AVA"


AVA_VOTE_COLUMNS = tuple(f"score{i}" for i in range(2, 12))  # score2 = votes for 1 ... score11 = votes for 10
AVA_TAG_COLUMNS = ("tag1", "tag2", "tag3")
AVA_COLUMNS = ("image_id",) + AVA_VOTE_COLUMNS + AVA_TAG_COLUMNS
SPLIT_INFO = "split_info.json"
_MAX_LISTED = 5  # names quoted in an error message


# --------------------------------------------------------------------------- transforms

def build_transform(style: str, train: bool) -> Any:
    """The reference transform of a data style ("tad66k" or "ava", ``preprocessing.TRANSFORMS``) for
    training or evaluation: TAD66K Resize((256,256)), RandomHorizontalFlip, RandomCrop(224) /
    Resize((224,224)); AVA PIL resize((224,224)) [, RandomHorizontalFlip]; then ToTensor, Normalize.
    Evaluation: ``images.EvalTransform``; training: a torchvision Compose (imported only then)."""
    if not train:
        return EvalTransform(style)
    if style not in TRANSFORMS:
        raise ValueError(f"transform style must be 'tad66k' or 'ava', got {style!r}")
    from torchvision import transforms  # here: evaluation and scoring need no torchvision

    spec = TRANSFORMS[style]
    resize = transforms.Resize(spec.train_size) if spec.resizer == "torchvision" else Resize(spec.train_size)
    steps: list[Any] = [resize, transforms.RandomHorizontalFlip()]
    if spec.train_crop:
        steps.append(transforms.RandomCrop(spec.train_crop))
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


# --------------------------------------------------------------------------- CSV reading

# Limits checked before a CSV is parsed, so that time and memory are bounded by them, not by the file.
# The largest real split CSVs: AVA's training CSV, about 230,000 rows and 11 MB; TAD66K's, 2 MB.
MAX_CSV_BYTES = 64 << 20
MAX_CSV_LINE = 16 << 10  # bytes of one line (an image name may be a 4 KiB path)
MAX_CSV_COLUMNS = 64


def _show(value: Any, limit: int = 80) -> str:
    """A user's cell or name for an error message: its repr, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 4]}...{text[-1]}"


def read_bounded_text(path: str | os.PathLike, what: str = "CSV", max_bytes: int = MAX_CSV_BYTES) -> str:
    """A CSV or list file's text (UTF-8, BOM dropped) after checking its size and its longest line
    against ``max_bytes`` and ``MAX_CSV_LINE``; DataError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path} not found" if not path.exists() else f"{what} {path} is not a file")
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise DataError(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise DataError(f"{what} {path} is larger than {max_bytes >> 20} MiB, more than any split needs "
                        f"(AVA's training CSV is about 11 MB); is it the right file?")
    ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
    lengths = np.diff(np.concatenate(([-1], ends, [len(data)])))
    if lengths.size and int(lengths.max()) > MAX_CSV_LINE + 1:
        line = int(np.argmax(lengths)) + 1
        raise DataError(f"{what} {path}: line {line} is {int(lengths.max()) - 1} bytes long, more than the "
                        f"{MAX_CSV_LINE} a row can hold; is it the right file?")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise DataError(f"{what} {path}: line {line} is not valid UTF-8 (byte {data[exc.start]:#04x}); "
                        f"save the file as UTF-8") from None


def check_csv_header(text: str, path: Path) -> None:
    """At most ``MAX_CSV_COLUMNS`` columns, none named twice (pandas would silently rename the second)."""
    first = re.split(r"\r\n|\r|\n", text.lstrip("\r\n"), maxsplit=1)[0]
    try:
        header = next(csv.reader([first]), [])
    except csv.Error as exc:
        raise DataError(f"CSV {path}: the header is not valid CSV ({exc})") from None
    if len(header) > MAX_CSV_COLUMNS:
        raise DataError(f"CSV {path}: the header has {len(header)} columns, more than the {MAX_CSV_COLUMNS} a "
                        f"split CSV can have; is it the right file?")
    seen: dict[str, int] = {}
    for number, name in enumerate((c.strip() for c in header), start=1):
        if name in seen:
            raise DataError(f"CSV {path}: column {_show(name)} appears twice in the header (columns "
                            f"{seen[name]} and {number}); rename or remove one")
        seen[name] = number


def _read_csv_text(path: Path) -> pd.DataFrame:
    """Every cell as a string (no NA guessing), blank lines skipped; DataError for unreadable files."""
    text = read_bounded_text(path)
    if not text.strip():
        raise DataError(f"CSV {path} is empty (no header, no rows)")
    check_csv_header(text, path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, skip_blank_lines=True,
                             index_col=False)
    except pd.errors.ParserWarning:
        raise DataError(f"CSV {path} is not a valid CSV: some rows have more fields than the header") from None
    except (pd.errors.ParserError, ValueError) as exc:
        raise DataError(f"CSV {path} is not a valid CSV: {_show(str(exc).strip(), 200)}") from None
    df.columns = [str(c).strip() for c in df.columns]
    return df


def _require_columns(df: pd.DataFrame, path: Path, required: Sequence[str]) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        has = ", ".join(_show(c, 40) for c in list(df.columns)[:10]) + (", ..." if len(df.columns) > 10 else "")
        raise DataError(f"CSV {path}: missing column(s) {', '.join(missing)} "
                        f"(has {has or 'none'}; expected {','.join(required)})")
    if len(df) == 0:
        raise DataError(f"CSV {path} has a header but no data rows (empty split)")


def _row_ref(df: pd.DataFrame, i: int, name_col: str) -> str:
    name = str(df[name_col].iloc[i])
    return f"row {i + 1} ({_show(name)})" if name else f"row {i + 1}"


def _check_names(df: pd.DataFrame, path: Path, col: str) -> None:
    """Names non-empty, free of control characters, unique."""
    names = df[col].astype(str)
    empty = np.flatnonzero((names.str.strip() == "").to_numpy())
    if empty.size:
        raise DataError(f"CSV {path}: row {int(empty[0]) + 1} has an empty {col}")
    control = np.flatnonzero(names.str.contains(r"[\x00-\x1f\x7f]", regex=True).to_numpy())
    if control.size:
        i = int(control[0])
        raise DataError(f"CSV {path}: row {i + 1} has a {col} with control characters: {_show(names.iloc[i])}")
    dup = names.duplicated(keep=False)
    if dup.any():
        first = names[dup].iloc[0]
        rows = [str(i + 1) for i in np.flatnonzero((names == first).to_numpy())]
        raise DataError(f"CSV {path}: {col} {_show(first)} appears more than once (rows {', '.join(rows[:10])}); "
                        f"{int(names[dup].nunique())} duplicated name(s) in all")


def _numbers(df: pd.DataFrame, path: Path, col: str, name_col: str, what: str) -> np.ndarray:
    """Column -> float64, DataError at the first empty / non-numeric / NaN cell."""
    raw = df[col].astype(str).str.strip()
    values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(np.isnan(values))
    if bad.size:
        i = int(bad[0])
        cell = raw.iloc[i]
        why = "is empty" if cell == "" else f"is not a number ({_show(cell)})" if cell.lower() != "nan" else "is NaN"
        raise DataError(f"CSV {path}: {_row_ref(df, i, name_col)}: {what}{col} {why}"
                        f"{f' ({bad.size} such rows)' if bad.size > 1 else ''}")
    return values


def _check_score_range(score_range: Sequence[float] | None) -> tuple[float, float] | None:
    if score_range is None:
        return None
    try:
        low, high = (float(v) for v in score_range)
    except (TypeError, ValueError):
        raise ValueError(f"score_range must be two numbers (low, high), got {score_range!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"score_range must be two finite numbers with low < high, got {score_range!r}")
    return low, high


def rescale_scores(raw: np.ndarray, score_range: Sequence[float]) -> np.ndarray:
    """Scores on ``score_range`` mapped linearly onto 1..10 (``--score_range``); the identity for
    1..10 exactly, so targets are the reference's score / 10 bit for bit."""
    low, high = _check_score_range(score_range)
    raw = np.asarray(raw, dtype=np.float64)
    return raw if (low, high) == (1.0, 10.0) else 1.0 + 9.0 * (raw - low) / (high - low)


def read_score_csv(path: str | os.PathLike, score_range: Sequence[float] | None = (1.0, 10.0)) -> pd.DataFrame:
    """Read an `image,score[,theme]` CSV (TAD66K format) and validate it.

    Returns columns image (str), score (float64) and, if present, theme (str).  DataError (naming
    the CSV and the 1-based data row) for a missing column, no rows, an empty or duplicated image
    name, or a score that is missing, non-numeric, infinite or outside score_range (None: no check).
    """
    path = Path(path)
    rng = _check_score_range(score_range)
    df = _read_csv_text(path)
    _require_columns(df, path, ("image", "score"))
    _check_names(df, path, "image")
    scores = _numbers(df, path, "score", "image", "")
    if rng is not None:
        out = np.flatnonzero(~((scores >= rng[0]) & (scores <= rng[1])))
        if out.size:
            i = int(out[0])
            raise DataError(f"CSV {path}: {_row_ref(df, i, 'image')}: score {scores[i]:g} is outside the "
                            f"score range {rng[0]:g}..{rng[1]:g} ({out.size} such rows); "
                            f"set the score range of your data")
    elif not np.all(np.isfinite(scores)):
        i = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise DataError(f"CSV {path}: {_row_ref(df, i, 'image')}: score is infinite")
    result = pd.DataFrame({"image": df["image"].astype(str).to_numpy(), "score": scores})
    if "theme" in df.columns:
        result["theme"] = df["theme"].astype(str).str.strip().to_numpy()
    return result


def read_ava_csv(path: str | os.PathLike) -> pd.DataFrame:
    """Read an AVA CSV `image_id,score2..score11,tag1,tag2,tag3` and validate it.

    Returns image_id (str; integer ids without leading zeros, as the reference reads them), the ten
    vote counts and three tags (int64).  DataError (naming the CSV
    and the row) for missing columns, no rows, empty or duplicated ids, vote counts that are
    missing, non-numeric, negative or non-integer, rows without any vote, and non-integer tags.
    """
    path = Path(path)
    df = _read_csv_text(path)
    _require_columns(df, path, AVA_COLUMNS)
    ids = df["image_id"].astype(str).str.strip()
    digits = ids.str.fullmatch(r"[0-9]+")
    # the reference reads ids as integers: "0123" names the file 123.jpg
    df["image_id"] = ids.where(~digits, ids.str.lstrip("0").replace("", "0"))
    _check_names(df, path, "image_id")
    out = pd.DataFrame({"image_id": df["image_id"].to_numpy()})
    for col in AVA_VOTE_COLUMNS + AVA_TAG_COLUMNS:
        what = "vote count" if col in AVA_VOTE_COLUMNS else "tag"
        values = _numbers(df, path, col, "image_id", what + " ")
        # at 2**53 and above, float64 (what the cell is parsed to) no longer holds every integer exactly
        bad = np.flatnonzero(~np.isfinite(values) | (values != np.round(values)) | (values < 0) | (values >= 2 ** 53))
        if bad.size:
            i = int(bad[0])
            problem = ("is negative" if values[i] < 0 else "is too large" if values[i] >= 2 ** 53
                       else "is not a whole number")
            raise DataError(f"CSV {path}: {_row_ref(df, i, 'image_id')}: {what} {col} = {_show(df[col].iloc[i])} "
                            f"{problem}{f' ({bad.size} such rows)' if bad.size > 1 else ''}")
        out[col] = values.astype(np.int64)
    zero = np.flatnonzero(out[list(AVA_VOTE_COLUMNS)].to_numpy().sum(axis=1) == 0)
    if zero.size:
        i = int(zero[0])
        raise DataError(f"CSV {path}: {_row_ref(df, i, 'image_id')} has no votes at all "
                        f"(all of score2..score11 are 0; {zero.size} such rows)")
    return out


def _theme_csv_images(path: Path) -> list[str]:
    df = _read_csv_text(path)
    _require_columns(df, path, ("image",))
    _check_names(df, path, "image")
    return df["image"].astype(str).tolist()


def read_theme_csvs(folder: str | os.PathLike, *more_folders: str | os.PathLike) -> dict[str, str]:
    """Image -> theme from per-theme CSVs `<theme>.csv` (an `image` column) in one or more folders.

    DataError if a folder has no CSV or an image is listed under two different themes.
    """
    themes: dict[str, str] = {}
    origin: dict[str, Path] = {}
    for folder in (folder, *more_folders):
        folder = Path(folder)
        if not folder.is_dir():
            raise DataError(f"theme folder {folder} not found")
        csvs = sorted(folder.glob("*.csv"))
        if not csvs:
            raise DataError(f"theme folder {folder} has no <theme>.csv files")
        for csv_path in csvs:
            theme = csv_path.stem
            for image in _theme_csv_images(csv_path):
                old = themes.get(image)
                if old is not None and old != theme:
                    raise DataError(f"image {image!r} is in two themes: {old!r} ({origin[image]}) and "
                                    f"{theme!r} ({csv_path})")
                themes[image] = theme
                origin[image] = csv_path
    return themes


# --------------------------------------------------------------------------- image paths

_SEPARATORS = ("/", "\\", ":") if os.name == "nt" else ("/",)


def _image_path(image_dir: str, name: str, allow_outside: bool) -> str:
    if not isinstance(name, str) or not name or "\x00" in name:
        raise DataError(f"invalid image name {_show(name)}")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"image name {_show(name)} is not valid Unicode") from None
    if not allow_outside and (name == ".." or any(sep in name for sep in _SEPARATORS)):
        pure = PurePath(name)  # the platform's own rules: on Windows both / and \ separate, C: is a drive
        if pure.is_absolute() or pure.anchor:
            raise DataError(f"image name {_show(name)} is an absolute path; names must be relative to the "
                            f"image folder {image_dir} (--path_to_images)")
        depth = 0
        for part in pure.parts:
            depth += -1 if part == ".." else 0 if part == "." else 1
            if depth < 0:
                raise DataError(f"image name {_show(name)} points outside the image folder {image_dir}; names "
                                f"must stay inside --path_to_images (set it to a folder that holds them all)")
    return os.path.join(image_dir, name)


def resolve_image_path(image_dir: str | os.PathLike, name: str, *, allow_outside: bool = False) -> Path:
    """image_dir / name; DataError if name is absolute or climbs out of image_dir (unless allow_outside)."""
    return Path(_image_path(os.fspath(image_dir), name, allow_outside))


def image_paths(csv_path: Path, image_dir: str | os.PathLike, names: Iterable[str], allow_outside: bool,
                suffix: str = "", follow_symlinks: bool = False, rows: Sequence[int] | None = None) -> list[str]:
    """image_dir / name (+ suffix) of every name; DataError naming the CSV and the row (``rows[i]``, else
    i + 1) for a name that is absolute, climbs out of image_dir, or is a link out of it (unless allowed)."""
    folder = os.fspath(image_dir)
    root = os.path.realpath(folder)
    paths = []
    for i, name in enumerate(names):
        try:
            path = _image_path(folder, name + suffix, allow_outside)
            # a name without a separator can only leave the folder if the file itself is a link
            if not (allow_outside or follow_symlinks) and ("/" in name or os.sep in name or os.path.islink(path)):
                real = link_leaves_folder(path, root)
                if real is not None:
                    raise DataError(f"image {_show(name)} is a symbolic link to {_show(real, 200)}, outside the "
                                    f"image folder {folder}; pass --follow_symlinks to allow links that leave it")
        except DataError as exc:
            raise DataError(f"CSV {csv_path}: row {rows[i] if rows is not None else i + 1}: {exc}") from None
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- datasets

class ImageTableDataset(Dataset):
    """Base of the datasets: one row per image with name, path, score (1..10), target, theme.

    Items are dicts {"image", "target", "score", "theme", "index", "path"}; with skip_bad an
    undecodable image gives None (use collate_skip_none). ``rows`` are the 1-based data rows of
    ``source`` (the CSV) that the items come from, for messages.
    """

    def __init__(self, *, names: Sequence[str], paths: Sequence[str], scores: np.ndarray, targets: np.ndarray,
                 themes: Sequence[str], transform: Any, skip_bad: bool, source: Path) -> None:
        self.rows = list(range(1, len(names) + 1))
        self.names = list(names)
        self.paths = [os.fspath(p) for p in paths]
        self.scores = np.asarray(scores, dtype=np.float64)
        self.targets = np.asarray(targets, dtype=np.float32)
        self.themes = list(themes)
        self.transform = transform
        self.skip_bad = bool(skip_bad)
        self.source = source

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        path = self.paths[index]
        try:
            img = load_image(path)
        except DataError as exc:
            if not self.skip_bad:
                raise
            logger.warning("skipping bad image %s (listed in %s): %s", path, self.source, exc)
            return None
        return {"image": self.transform(img), "target": torch.from_numpy(self.targets[index].copy()),
                "score": float(self.scores[index]), "theme": self.themes[index], "index": int(index),
                "path": path}

    def keep(self, mask: Sequence[bool] | np.ndarray) -> None:
        """Keep only the rows where mask is True (in place)."""
        m = np.asarray(mask, dtype=bool)
        if m.shape != (len(self),):
            raise ValueError(f"keep: mask must have {len(self)} entries, got shape {m.shape}")
        idx = np.flatnonzero(m)
        self.rows = [self.rows[i] for i in idx]
        self.names = [self.names[i] for i in idx]
        self.paths = [self.paths[i] for i in idx]
        self.themes = [self.themes[i] for i in idx]
        self.scores = self.scores[idx]
        self.targets = self.targets[idx]

    def subset(self, mask: Sequence[bool] | np.ndarray, *, train: bool | None = None) -> "ImageTableDataset":
        """A copy with only the rows where mask is True, with the transform of ``train`` when given."""
        part = copy.copy(self)
        part.keep(mask)
        if train is not None:
            part.train = bool(train)
            part.transform = build_transform(part.transform_style, train)
        return part

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images from {self.source})"


class ScoreImageDataset(ImageTableDataset):
    """TAD66K-format data: an `image,score[,theme]` CSV and an image folder.

    Scores are mapped linearly from score_range onto 1..10; target = score / 10, shape (1,).
    Theme: the CSV's theme column, else themes[image], else "".
    """

    def __init__(self, csv_path: str | os.PathLike, image_dir: str | os.PathLike, *, train: bool,
                 themes: Mapping[str, str] | None = None, score_range: Sequence[float] = (1.0, 10.0),
                 transform_style: str = "tad66k", skip_bad: bool = False, allow_outside: bool = False,
                 follow_symlinks: bool = False) -> None:
        low, high = _check_score_range(score_range)
        df = read_score_csv(csv_path, (low, high))
        csv_path = Path(csv_path)
        paths = image_paths(csv_path, image_dir, df["image"], allow_outside, follow_symlinks=follow_symlinks)
        scores = rescale_scores(df["score"].to_numpy(), (low, high))
        if "theme" in df.columns:
            theme_list = df["theme"].tolist()
        elif themes is not None:
            theme_list = [themes.get(name, "") for name in df["image"]]
            unthemed = sum(1 for t in theme_list if not t)
            if unthemed:
                logger.warning("%d of %d images of %s have no theme in the theme map", unthemed, len(df), csv_path)
        else:
            theme_list = [""] * len(df)
        super().__init__(names=df["image"].tolist(), paths=paths, scores=scores,
                         targets=(scores / 10.0)[:, None], themes=theme_list,
                         transform=build_transform(transform_style, train), skip_bad=skip_bad, source=csv_path)
        self.train = bool(train)
        self.transform_style = transform_style
        self.themed = "theme" in df.columns or themes is not None


class AVADataset(ImageTableDataset):
    """AVA data: an `image_id,score2..score11,tag1..tag3` CSV and a folder of `<image_id>.jpg`.

    ``distribution`` (a model whose output is a distribution, the "ava" variant): target = votes / sum(votes),
    shape (10,); else (one score, "tad66k"): target = mean score / 10, shape (1,). `score` is the mean
    score sum_k k p_k on 1..10; themes are "".
    """

    def __init__(self, csv_path: str | os.PathLike, image_dir: str | os.PathLike, *, train: bool,
                 distribution: bool = True, skip_bad: bool = False, allow_outside: bool = False,
                 follow_symlinks: bool = False) -> None:
        df = read_ava_csv(csv_path)
        csv_path = Path(csv_path)
        paths = image_paths(csv_path, image_dir, df["image_id"], allow_outside, suffix=".jpg",
                            follow_symlinks=follow_symlinks)
        votes = df[list(AVA_VOTE_COLUMNS)].to_numpy(dtype=np.float64)
        dist = votes / votes.sum(axis=1, keepdims=True)
        scores = dist @ np.arange(1, 11, dtype=np.float64)
        targets = dist if distribution else (scores / 10.0)[:, None]
        super().__init__(names=df["image_id"].tolist(), paths=paths, scores=scores, targets=targets,
                         themes=[""] * len(df), transform=build_transform("ava", train), skip_bad=skip_bad,
                         source=csv_path)
        self.train = bool(train)
        self.transform_style = "ava"
        self.distribution = bool(distribution)


def collate_skip_none(batch: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """default_collate after dropping the None items of skipped bad images; None if all were bad."""
    kept = [item for item in batch if item is not None]
    return default_collate(kept) if kept else None


# --------------------------------------------------------------------------- validation split

def _split_counts(groups: Mapping[str, int], fraction: float) -> dict[str, int]:
    """Validation images per group: round(fraction * N) in all, shared by largest remainder."""
    total = sum(groups.values())
    n_val = min(total - 1, max(1, int(round(fraction * total))))
    exact = {g: n_val * c / total for g, c in groups.items()}
    counts = {g: int(math.floor(x)) for g, x in exact.items()}
    order = sorted(groups, key=lambda g: (-(exact[g] - counts[g]), g))
    for g in order[:n_val - sum(counts.values())]:
        counts[g] += 1
    return counts


def carve_validation(labels: Sequence[str], *, fraction: float = 0.1, seed: int = 0) -> np.ndarray:
    """Which rows go to validation: round(fraction * N) rows, stratified by label (a theme, or "" for
    none), drawn by a generator seeded with ``seed``; deterministic for the same labels, fraction and seed."""
    if not (isinstance(fraction, (int, float)) and 0.0 < float(fraction) < 1.0):
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"split seed must be a non-negative integer, got {seed!r}")
    groups: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    counts = _split_counts({g: len(v) for g, v in groups.items()}, float(fraction))
    rng = np.random.default_rng(int(seed))
    val_rows: list[int] = []
    for g in sorted(groups):
        members = np.asarray(groups[g])
        val_rows += members[rng.permutation(members.size)[:counts[g]]].tolist()
    is_val = np.zeros(len(labels), dtype=bool)
    is_val[val_rows] = True
    return is_val


def _split_info(train_csv: Path, names: Sequence[str], labels: Sequence[str] | None, fraction: float,
                seed: int) -> dict:
    digest = None
    if labels is not None:
        h = hashlib.sha256()
        for name, label in zip(names, labels):
            h.update(f"{name}\x00{label}\n".encode("utf-8"))
        digest = h.hexdigest()
    return {"source_csv": str(train_csv), "source_sha256": sha256_file(train_csv), "fraction": float(fraction),
            "seed": int(seed), "themes_sha256": digest}


def _recorded_split(info_path: Path) -> dict | None:
    """The split_info.json this project wrote there, or None."""
    try:
        old = json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return old if isinstance(old, dict) and {"train_sha256", "val_sha256", "source_sha256"} <= set(old) else None


def write_split_record(train_csv: str | os.PathLike, is_val: np.ndarray, out_dir: str | os.PathLike,
                       info: dict, rows: pd.DataFrame | None = None) -> tuple[Path, Path]:
    """Write the carved split as ``out_dir/train_split.csv`` and ``val_split.csv`` (the training CSV's
    rows, cells unchanged; or ``rows``, one per image, for data whose CSV is not one row per image)
    with ``split_info.json``, atomically.

    Files already there are only replaced when this project wrote them (split_info.json records
    their sha256) and never when one is the training CSV itself: DataError naming the file otherwise.
    Unchanged files are left as they are.
    """
    train_csv, out_dir = Path(train_csv), Path(out_dir)
    train_out, val_out, info_path = out_dir / "train_split.csv", out_dir / "val_split.csv", out_dir / SPLIT_INFO
    for target in (train_out, val_out, info_path):
        if target.exists() and os.path.samefile(target, train_csv):
            raise DataError(f"the training CSV {train_csv} is named like the validation split written into "
                            f"{out_dir}; it is never overwritten: rename it, or choose another --split_dir")
    old = _recorded_split(info_path)
    for target, key in ((train_out, "train_sha256"), (val_out, "val_sha256"), (info_path, None)):
        if not target.exists():
            continue
        if old is None:
            raise DataError(f"{target} exists and was not written by this project ({SPLIT_INFO} does not record "
                            f"it), so it is never overwritten: move it, or choose another --split_dir")
        if key is not None and not (target.is_file() and sha256_file(target) == old[key]):
            raise DataError(f"{target} was changed after this project wrote it, so it is never overwritten: "
                            f"move it, or choose another --split_dir")
    if old is not None and all(old.get(k) == v for k, v in info.items() if k != "source_csv") \
            and train_out.exists() and val_out.exists():
        return train_out, val_out
    raw = _read_csv_text(train_csv) if rows is None else rows  # the original cells, unchanged
    try:
        for path, rows in ((train_out, raw[~is_val]), (val_out, raw[is_val])):
            with atomic_write(path, "w") as f:
                rows.to_csv(f, index=False, lineterminator="\n")
        atomic_save_json({**info, "train_sha256": sha256_file(train_out), "val_sha256": sha256_file(val_out),
                          "n_train": int((~is_val).sum()), "n_val": int(is_val.sum()),
                          "stratified_by_theme": info["themes_sha256"] is not None}, info_path)
    except OSError as exc:
        raise DataError(f"cannot write the validation split into {out_dir} ({exc.strerror or exc}); "
                        f"choose another --split_dir") from None
    return train_out, val_out


def make_validation_split(train_csv: str | os.PathLike, out_dir: str | os.PathLike, *, fraction: float = 0.1,
                          seed: int = 0, themes: Mapping[str, str] | None = None,
                          score_range: Sequence[float] | None = None) -> tuple[Path, Path]:
    """Carve a validation split off a training CSV and write it to out_dir (``write_split_record``).

    Deterministic for (CSV content, fraction, seed, themes); stratified by theme (the CSV's theme
    column, else ``themes``) when there are themes.
    """
    train_csv = Path(train_csv)
    carve_validation([], fraction=fraction, seed=seed)  # the arguments, before reading anything
    df = read_score_csv(train_csv, score_range)
    if len(df) < 2:
        raise DataError(f"CSV {train_csv} has {len(df)} row(s); a validation split needs at least 2")
    theme_of = dict(zip(df["image"], df["theme"])) if "theme" in df.columns else themes
    labels = [theme_of.get(n, "") for n in df["image"]] if theme_of is not None else None
    is_val = carve_validation(labels or [""] * len(df), fraction=fraction, seed=seed)
    info = _split_info(train_csv, df["image"].tolist(), labels, fraction, seed)
    return write_split_record(train_csv, is_val, out_dir, info)


# --------------------------------------------------------------------------- build_datasets

def _existing_csv(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{what} CSV {path} not found")
    return path


def tad66k_csv_files(root: str | os.PathLike) -> tuple[Path, Path, tuple[Path, Path] | None]:
    """(train CSV, test CSV, per-theme CSV folders or None) of a TAD66K-format CSV folder, in either form:
    ``root/merge/{train,test}.csv`` with ``root/unmerge/{train,test}/<theme>.csv`` (``data/TAD66K``), or
    the reference's ``root/{train,test}.csv`` (its ``--path_to_save_csv ./dataset/merge/``) with the
    theme CSVs in ``root/../unmerge/`` or ``root/unmerge/`` when they are there."""
    root = Path(root)
    for folder, theme_roots in ((root / "merge", [root / "unmerge"]),
                                (root, [root.parent / "unmerge", root / "unmerge"])):
        train, test = folder / "train.csv", folder / "test.csv"
        if train.is_file() and test.is_file():
            for themes in theme_roots:
                theme_dirs = (themes / "train", themes / "test")
                if all(d.is_dir() for d in theme_dirs):
                    return train, test, theme_dirs
            return train, test, None
    raise DataError(f"CSV folder {root} (--path_to_save_csv) holds neither merge/train.csv and merge/test.csv "
                    f"(the data/TAD66K form) nor train.csv and test.csv (the reference's form)")


def build_datasets(name: str, *, distribution: bool, image_dir: str | os.PathLike | None = None,
                   csv_dir: str | os.PathLike | None = None, validation: str = "split",
                   val_fraction: float = 0.1, seed: int = 0, score_range: Sequence[float] = (1.0, 10.0),
                   skip_bad: bool = False, train_csv: str | os.PathLike | None = None,
                   val_csv: str | os.PathLike | None = None, test_csv: str | os.PathLike | None = None,
                   split_dir: str | os.PathLike | None = None, allow_outside: bool = False,
                   follow_symlinks: bool = False, demo_options: Mapping[str, Any] | None = None) -> dict[str, Dataset]:
    """{"train", "val", "test"} datasets for name "tad66k", "ava", "csv" (your own image,score CSVs)
    or "demo" (generated on first use). ``distribution``: the targets are vote distributions (a model
    like the "ava" variant; AVA's data only), else one score / 10.

    validation "split": val is carved off the training CSV's rows in memory (``carve_validation``;
    recorded in split_dir by ``write_split_record`` when given), or AVA's val.csv; "test": val is the
    test split (the reference's protocol). Errors name the user's CSVs and their rows.
    demo_options: keyword arguments of demo_data.ensure_demo_dataset (n_train, n_test, seed, size).
    """
    if name not in ("tad66k", "ava", "csv", "demo"):
        hint = " (FLICKR-AES: flickr_aes.build_flickr_datasets)" if name == "flickr_aes" else ""
        raise ValueError(f"dataset must be one of tad66k, ava, csv, demo; got {name!r}{hint}")
    if validation not in ("split", "test"):
        raise ValueError(f"validation must be 'split' or 'test', got {validation!r}")
    if name != "ava" and distribution:
        raise ValueError(f"the 'ava' variant needs vote distributions, which only the AVA data has; "
                         f"use variant 'tad66k' with dataset {name!r}")
    if name == "ava":
        return _build_ava(distribution=distribution, image_dir=image_dir, csv_dir=csv_dir, validation=validation,
                          skip_bad=skip_bad, train_csv=train_csv, val_csv=val_csv, test_csv=test_csv,
                          allow_outside=allow_outside, follow_symlinks=follow_symlinks)

    themes: dict[str, str] | None = None
    if name == "csv":
        if train_csv is None or test_csv is None:
            raise ValueError("dataset 'csv' needs train_csv and test_csv (val_csv is optional)")
        if image_dir is None:
            raise ValueError("dataset 'csv' needs image_dir, the folder the CSVs' image names are relative to")
        train_csv, test_csv = _existing_csv(Path(train_csv), "training"), _existing_csv(Path(test_csv), "test")
    else:
        if name == "demo":
            from imagedata.demo_data import ensure_demo_dataset  # deferred: imports scikit-learn
            root = ensure_demo_dataset(csv_dir, **dict(demo_options or {}))
            image_dir = root / "images" if image_dir is None else image_dir
            score_range = (1.0, 10.0)
        else:
            root = Path(csv_dir) if csv_dir is not None else DEFAULT_TAD66K_DIR
            if image_dir is None:
                raise ValueError("dataset 'tad66k' needs image_dir, the folder of the TAD66K images")
        found_train, found_test, theme_dirs = tad66k_csv_files(root)
        train_csv = _existing_csv(Path(train_csv), "training") if train_csv is not None else found_train
        test_csv = _existing_csv(Path(test_csv), "test") if test_csv is not None else found_test
        if theme_dirs is not None:
            themes = read_theme_csvs(*theme_dirs)
        else:
            logger.warning("no per-theme CSVs (unmerge/train, unmerge/test) beside %s: no per-theme metrics, "
                           "and the validation split is not stratified by theme", train_csv.parent)

    common = dict(themes=themes, score_range=score_range, skip_bad=skip_bad, allow_outside=allow_outside,
                  follow_symlinks=follow_symlinks)
    test = ScoreImageDataset(test_csv, image_dir, train=False, **common)
    if validation == "test":
        return {"train": ScoreImageDataset(train_csv, image_dir, train=True, **common),
                "val": ScoreImageDataset(test_csv, image_dir, train=False, **common), "test": test}
    if val_csv is not None:
        return {"train": ScoreImageDataset(train_csv, image_dir, train=True, **common),
                "val": ScoreImageDataset(_existing_csv(Path(val_csv), "validation"), image_dir, train=False, **common),
                "test": test}
    full = ScoreImageDataset(train_csv, image_dir, train=True, **common)
    if len(full) < 2:
        raise DataError(f"CSV {train_csv} has {len(full)} row(s); a validation split needs at least 2")
    labels = full.themes if full.themed else None
    is_val = carve_validation(labels or [""] * len(full), fraction=val_fraction, seed=seed)
    if split_dir is not None:
        write_split_record(train_csv, is_val, split_dir, _split_info(train_csv, full.names, labels, val_fraction, seed))
    return {"train": full.subset(~is_val), "val": full.subset(is_val, train=False), "test": test}


def _build_ava(*, distribution: bool, image_dir: str | os.PathLike | None, csv_dir: str | os.PathLike | None,
               validation: str, skip_bad: bool, train_csv: str | os.PathLike | None,
               val_csv: str | os.PathLike | None, test_csv: str | os.PathLike | None,
               allow_outside: bool, follow_symlinks: bool) -> dict[str, Dataset]:
    if image_dir is None:
        raise ValueError("dataset 'ava' needs image_dir, the folder of the AVA <image_id>.jpg files")
    root = Path(csv_dir) if csv_dir is not None else DEFAULT_AVA_DIR
    train_path = Path(train_csv) if train_csv is not None else root / "train.csv"
    if not train_path.is_file():
        raise DataError(f"AVA training CSV {train_path} not found: put the reference's train.csv there (the "
                        f"authors' repository holds it as code/AVA/dataset/train.csv), or build one from AVA.txt "
                        f"with `python tools/make_ava_splits.py --ava_txt /path/to/AVA.txt --out_dir {root}`")
    test_path = _existing_csv(Path(test_csv) if test_csv is not None else root / "test.csv", "AVA test")
    if validation == "test":
        val_path = test_path
    else:
        val_path = _existing_csv(Path(val_csv) if val_csv is not None else root / "val.csv", "AVA validation")
    common = dict(distribution=distribution, skip_bad=skip_bad, allow_outside=allow_outside,
                  follow_symlinks=follow_symlinks)
    return {"train": AVADataset(train_path, image_dir, train=True, **common),
            "val": AVADataset(val_path, image_dir, train=False, **common),
            "test": AVADataset(test_path, image_dir, train=False, **common)}
