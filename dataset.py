"""Data loading for TANet: CSV readers with validation, robust image loading, the reference's
transforms, TAD66K-format and AVA datasets, missing-image checks and the validation split."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, default_collate
from torchvision import transforms

from safe_io import atomic_save_json, atomic_write, sha256_file

logger = logging.getLogger(__name__)

REPO_DIR = Path(__file__).resolve().parent
DEFAULT_TAD66K_DIR = REPO_DIR / "data" / "TAD66K"
DEFAULT_AVA_DIR = REPO_DIR / "data" / "AVA"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

AVA_VOTE_COLUMNS = tuple(f"score{i}" for i in range(2, 12))  # score2 = votes for 1 ... score11 = votes for 10
AVA_TAG_COLUMNS = ("tag1", "tag2", "tag3")
AVA_COLUMNS = ("image_id",) + AVA_VOTE_COLUMNS + AVA_TAG_COLUMNS
SPLIT_INFO = "split_info.json"
# Raster formats we open; others (EPS via Ghostscript, PDF, ...) are refused as not images.
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "DIB", "GIF", "TIFF", "WEBP", "PPM", "TGA", "JPEG2000")
_MAX_LISTED = 5  # names quoted in an error message


class DataError(ValueError):
    """Bad data: a CSV, row or image file that cannot be used (the message names it)."""


# --------------------------------------------------------------------------- images

def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB, as load_image converts files: transparency composited onto white,
    16-bit values / 257, 32-bit ints as 8-bit if <= 255 else as 16-bit, floats in 0..1 times 255.

    ValueError for a mode Pillow cannot convert.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(img)
        if mode.startswith("I;16"):
            a = a.astype(np.float64) / 257.0  # 0..65535 -> 0..255
        elif mode == "F":  # floats: 0..1 if they fit, else taken as 0..255 values
            a = a.astype(np.float64)
            finite_max = np.nanmax(a) if a.size and np.isfinite(a).any() else 0.0
            a = a * 255.0 if finite_max <= 1.0 else a
        else:  # 32-bit ints: 8-bit values if they fit, else 16-bit (PNG/TIFF), else min-max
            a = a.astype(np.float64)
            top = a.max() if a.size else 0
            if top > 65535:
                low = a.min()
                a = (a - low) * (255.0 / (top - low))
            elif top > 255:
                a = a / 257.0
        a = np.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0)
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    elif mode in ("LA", "PA", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    return img.convert("RGB")


_to_rgb = to_rgb  # older name, still imported elsewhere


def _open_formats() -> tuple[str, ...]:
    Image.init()  # registers every plugin, so the names below are known
    return tuple(f for f in IMAGE_FORMATS if f in Image.OPEN)


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file fully decoded, EXIF-oriented, in RGB; DataError naming the file if it
    is missing, empty, not an image, truncated or a decompression bomb.

    Alpha is composited onto white; 16-bit images are scaled to 8 bits (value / 257).
    """
    p = Path(path)
    try:
        if not p.is_file():
            raise DataError(f"image file {p} not found" if not p.exists() else f"image path {p} is not a file")
        if p.stat().st_size == 0:
            raise DataError(f"image file {p} is empty (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p, formats=_open_formats()) as img:
                img.load()
                oriented = ImageOps.exif_transpose(img)
                try:
                    rgb = to_rgb(oriented)
                except ValueError as exc:
                    raise DataError(f"image file {p} has pixel format {oriented.mode!r}, which cannot be "
                                    f"converted to RGB: {exc}") from None
        return rgb
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"image file {p} refused as a possible decompression bomb: {exc}") from None
    except Image.UnidentifiedImageError:
        raise DataError(f"image file {p} is not a readable image (corrupt, or not one of "
                        f"{', '.join(IMAGE_FORMATS)})") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for broken files
        raise DataError(f"image file {p} could not be decoded (truncated or corrupt?): "
                        f"{type(exc).__name__}: {exc}") from None


# --------------------------------------------------------------------------- transforms

class PilResize:
    """PIL `img.resize(size)` with Pillow's default filter (the reference's AVA preprocessing)."""

    def __init__(self, size: tuple[int, int] = (224, 224)) -> None:
        self.size = tuple(size)

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.resize(self.size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


def _to_normalised_tensor() -> list:
    return [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def tad66k_train_transform() -> transforms.Compose:
    """Reference TAD66K training: Resize((256,256)), RandomHorizontalFlip, RandomCrop(224), ToTensor, Normalize."""
    return transforms.Compose([transforms.Resize((256, 256)), transforms.RandomHorizontalFlip(),
                               transforms.RandomCrop(224), *_to_normalised_tensor()])


def tad66k_eval_transform() -> transforms.Compose:
    """Reference TAD66K test: Resize((224,224)), ToTensor, Normalize."""
    return transforms.Compose([transforms.Resize((224, 224)), *_to_normalised_tensor()])


def ava_train_transform() -> transforms.Compose:
    """Reference AVA training: PIL resize((224,224)), RandomHorizontalFlip, ToTensor, Normalize."""
    return transforms.Compose([PilResize((224, 224)), transforms.RandomHorizontalFlip(), *_to_normalised_tensor()])


def ava_eval_transform() -> transforms.Compose:
    """Reference AVA test: PIL resize((224,224)), ToTensor, Normalize."""
    return transforms.Compose([PilResize((224, 224)), *_to_normalised_tensor()])


def build_transform(style: str, train: bool) -> transforms.Compose:
    """The reference transform of a style ("tad66k" or "ava") for training or evaluation."""
    table = {("tad66k", True): tad66k_train_transform, ("tad66k", False): tad66k_eval_transform,
             ("ava", True): ava_train_transform, ("ava", False): ava_eval_transform}
    if (style, bool(train)) not in table:
        raise ValueError(f"transform style must be 'tad66k' or 'ava', got {style!r}")
    return table[(style, bool(train))]()


# --------------------------------------------------------------------------- CSV reading

def _read_csv_text(path: Path) -> pd.DataFrame:
    """Every cell as a string (no NA guessing), blank lines skipped; DataError for unreadable files."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"CSV {path} not found") from None
    except OSError as exc:
        raise DataError(f"CSV {path} cannot be read: {exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise DataError(f"CSV {path}: line {line} is not valid UTF-8 (byte {data[exc.start]:#04x}); "
                        f"save the file as UTF-8") from None
    if not text.strip():
        raise DataError(f"CSV {path} is empty (no header, no rows)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, skip_blank_lines=True,
                             index_col=False)
    except pd.errors.ParserWarning:
        raise DataError(f"CSV {path} is not a valid CSV: some rows have more fields than the header") from None
    except (pd.errors.ParserError, ValueError) as exc:
        raise DataError(f"CSV {path} is not a valid CSV: {str(exc).strip()}") from None
    df.columns = [str(c).strip() for c in df.columns]
    return df


def _require_columns(df: pd.DataFrame, path: Path, required: Sequence[str]) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"CSV {path}: missing column(s) {', '.join(missing)} "
                        f"(has {', '.join(map(str, df.columns)) or 'none'}; expected {','.join(required)})")
    if len(df) == 0:
        raise DataError(f"CSV {path} has a header but no data rows (empty split)")


def _row_ref(df: pd.DataFrame, i: int, name_col: str) -> str:
    name = str(df[name_col].iloc[i])
    return f"row {i + 1} ({name!r})" if name else f"row {i + 1}"


def _check_names(df: pd.DataFrame, path: Path, col: str) -> None:
    """Names non-empty, free of control characters, unique."""
    names = df[col].astype(str)
    empty = np.flatnonzero((names.str.strip() == "").to_numpy())
    if empty.size:
        raise DataError(f"CSV {path}: row {int(empty[0]) + 1} has an empty {col}")
    control = np.flatnonzero(names.str.contains(r"[\x00-\x1f\x7f]", regex=True).to_numpy())
    if control.size:
        i = int(control[0])
        raise DataError(f"CSV {path}: row {i + 1} has a {col} with control characters: {names.iloc[i]!r}")
    dup = names.duplicated(keep=False)
    if dup.any():
        first = names[dup].iloc[0]
        rows = [str(i + 1) for i in np.flatnonzero((names == first).to_numpy())]
        raise DataError(f"CSV {path}: {col} {first!r} appears more than once (rows {', '.join(rows)}); "
                        f"{int(names[dup].nunique())} duplicated name(s) in all")


def _numbers(df: pd.DataFrame, path: Path, col: str, name_col: str, what: str) -> np.ndarray:
    """Column -> float64, DataError at the first empty / non-numeric / NaN cell."""
    raw = df[col].astype(str).str.strip()
    values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(np.isnan(values))
    if bad.size:
        i = int(bad[0])
        cell = raw.iloc[i]
        why = "is empty" if cell == "" else f"is not a number ({cell!r})" if cell.lower() != "nan" else "is NaN"
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
            raise DataError(f"CSV {path}: {_row_ref(df, i, 'image_id')}: {what} {col} = {df[col].iloc[i]!r} "
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
        raise DataError(f"invalid image name {name!r}")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"image name {name!r} is not valid Unicode") from None
    if not allow_outside and (name == ".." or any(sep in name for sep in _SEPARATORS)):
        pure = PurePath(name)  # the platform's own rules: on Windows both / and \ separate, C: is a drive
        if pure.is_absolute() or pure.anchor:
            raise DataError(f"image name {name!r} is an absolute path; names must be relative to the "
                            f"image folder {image_dir} (allow_outside=True to accept it)")
        depth = 0
        for part in pure.parts:
            depth += -1 if part == ".." else 0 if part == "." else 1
            if depth < 0:
                raise DataError(f"image name {name!r} points outside the image folder {image_dir} "
                                f"(allow_outside=True to accept it)")
    return os.path.join(image_dir, name)


def resolve_image_path(image_dir: str | os.PathLike, name: str, *, allow_outside: bool = False) -> Path:
    """image_dir / name; DataError if name is absolute or climbs out of image_dir (unless allow_outside)."""
    return Path(_image_path(os.fspath(image_dir), name, allow_outside))


def _image_paths(csv_path: Path, image_dir: str | os.PathLike, names: Iterable[str], allow_outside: bool,
                 suffix: str = "") -> list[str]:
    folder = os.fspath(image_dir)
    paths = []
    for i, name in enumerate(names):
        try:
            paths.append(_image_path(folder, name + suffix, allow_outside))
        except DataError as exc:
            raise DataError(f"CSV {csv_path}: row {i + 1}: {exc}") from None
    return paths


# --------------------------------------------------------------------------- datasets

class ImageTableDataset(Dataset):
    """Base of the datasets: one row per image with name, path, score (1..10), target, theme.

    Items are dicts {"image", "target", "score", "theme", "index", "path"}; with skip_bad an
    undecodable image gives None (use collate_skip_none).
    """

    def __init__(self, *, names: Sequence[str], paths: Sequence[str], scores: np.ndarray, targets: np.ndarray,
                 themes: Sequence[str], transform: Any, skip_bad: bool, source: Path) -> None:
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
        self.names = [self.names[i] for i in idx]
        self.paths = [self.paths[i] for i in idx]
        self.themes = [self.themes[i] for i in idx]
        self.scores = self.scores[idx]
        self.targets = self.targets[idx]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images from {self.source})"


class ScoreImageDataset(ImageTableDataset):
    """TAD66K-format data: an `image,score[,theme]` CSV and an image folder.

    Scores are mapped linearly from score_range onto 1..10; target = score / 10, shape (1,).
    Theme: the CSV's theme column, else themes[image], else "".
    """

    def __init__(self, csv_path: str | os.PathLike, image_dir: str | os.PathLike, *, train: bool,
                 themes: Mapping[str, str] | None = None, score_range: Sequence[float] = (1.0, 10.0),
                 transform_style: str = "tad66k", skip_bad: bool = False, allow_outside: bool = False) -> None:
        low, high = _check_score_range(score_range)
        df = read_score_csv(csv_path, (low, high))
        csv_path = Path(csv_path)
        paths = _image_paths(csv_path, image_dir, df["image"], allow_outside)
        raw = df["score"].to_numpy()
        # identity for 1..10 exactly, so targets are the reference's score / 10 bit for bit
        scores = raw if (low, high) == (1.0, 10.0) else 1.0 + 9.0 * (raw - low) / (high - low)
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


class AVADataset(ImageTableDataset):
    """AVA data: an `image_id,score2..score11,tag1..tag3` CSV and a folder of `<image_id>.jpg`.

    variant "ava": target = votes / sum(votes), shape (10,); variant "tad66k": target = mean
    score / 10, shape (1,).  `score` is the mean score sum_k k p_k on 1..10; themes are "".
    """

    def __init__(self, csv_path: str | os.PathLike, image_dir: str | os.PathLike, *, train: bool,
                 variant: str = "ava", skip_bad: bool = False, allow_outside: bool = False) -> None:
        if variant not in ("ava", "tad66k"):
            raise ValueError(f"variant must be 'ava' or 'tad66k', got {variant!r}")
        df = read_ava_csv(csv_path)
        csv_path = Path(csv_path)
        paths = _image_paths(csv_path, image_dir, df["image_id"], allow_outside, suffix=".jpg")
        votes = df[list(AVA_VOTE_COLUMNS)].to_numpy(dtype=np.float64)
        dist = votes / votes.sum(axis=1, keepdims=True)
        scores = dist @ np.arange(1, 11, dtype=np.float64)
        targets = dist if variant == "ava" else (scores / 10.0)[:, None]
        super().__init__(names=df["image_id"].tolist(), paths=paths, scores=scores, targets=targets,
                         themes=[""] * len(df), transform=build_transform("ava", train), skip_bad=skip_bad,
                         source=csv_path)
        self.train = bool(train)
        self.variant = variant


def collate_skip_none(batch: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """default_collate after dropping the None items of skipped bad images; None if all were bad."""
    kept = [item for item in batch if item is not None]
    return default_collate(kept) if kept else None


def check_images_exist(dataset: ImageTableDataset, *, skip_missing: bool = False,
                       missing_log: str | os.PathLike | None = None) -> ImageTableDataset:
    """Check every image file of the dataset exists; return the dataset.

    Missing files: DataError with the count and the first names, unless skip_missing, which drops
    them from the dataset (in place), writes their names to missing_log and logs a warning.
    """
    missing = np.array([not os.path.isfile(p) for p in dataset.paths], dtype=bool)
    n = int(missing.sum())
    if n == 0:
        return dataset
    names = [dataset.names[i] for i in np.flatnonzero(missing)]
    listed = ", ".join(repr(x) for x in names[:_MAX_LISTED]) + (", ..." if n > _MAX_LISTED else "")
    where = f"{n} of {len(dataset)} images listed in {dataset.source} are missing"
    folder = os.path.dirname(dataset.paths[int(np.flatnonzero(missing)[0])])
    if not skip_missing:
        raise DataError(f"{where} (first: {listed}; looked in {folder}); check the image folder, or pass "
                        f"--skip_missing to train without them")
    if n == len(dataset):
        raise DataError(f"{where}: all of them (first: {listed}; looked in {folder}); check the image folder")
    if missing_log is not None:
        with atomic_write(missing_log, "w") as f:
            f.write("".join(f"{x}\n" for x in names))
    logger.warning("%s; skipping them (--skip_missing)%s", where,
                   f", names written to {missing_log}" if missing_log is not None else "")
    dataset.keep(~missing)
    return dataset


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


def _themes_digest(names: Iterable[str], themes: Mapping[str, str] | None) -> str | None:
    if themes is None:
        return None
    h = hashlib.sha256()
    for name in names:
        h.update(f"{name}\x00{themes.get(name, '')}\n".encode("utf-8"))
    return h.hexdigest()


def make_validation_split(train_csv: str | os.PathLike, out_dir: str | os.PathLike, *, fraction: float = 0.1,
                          seed: int = 0, themes: Mapping[str, str] | None = None,
                          score_range: Sequence[float] | None = None) -> tuple[Path, Path]:
    """Carve a validation split off a training CSV: write out_dir/train_split.csv and val_split.csv.

    Deterministic for (CSV content, fraction, seed, themes); stratified by theme (the CSV's theme
    column, else `themes`) when there are themes.  Reuses existing files made from the same inputs
    (recorded in split_info.json), rebuilds otherwise; every file is written atomically.
    """
    train_csv, out_dir = Path(train_csv), Path(out_dir)
    if not (isinstance(fraction, (int, float)) and 0.0 < float(fraction) < 1.0):
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"split seed must be a non-negative integer, got {seed!r}")
    df = read_score_csv(train_csv, score_range)
    if len(df) < 2:
        raise DataError(f"CSV {train_csv} has {len(df)} row(s); a validation split needs at least 2")
    theme_of = (dict(zip(df["image"], df["theme"])) if "theme" in df.columns else themes)
    info = {"source_csv": str(train_csv), "source_sha256": sha256_file(train_csv), "fraction": float(fraction),
            "seed": int(seed), "themes_sha256": _themes_digest(df["image"], theme_of)}
    train_out, val_out, info_path = out_dir / "train_split.csv", out_dir / "val_split.csv", out_dir / SPLIT_INFO
    if _split_is_current(info, train_out, val_out, info_path):
        return train_out, val_out

    labels = [theme_of.get(n, "") for n in df["image"]] if theme_of is not None else [""] * len(df)
    groups: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    counts = _split_counts({g: len(v) for g, v in groups.items()}, float(fraction))
    rng = np.random.default_rng(int(seed))
    val_rows: list[int] = []
    for g in sorted(groups):
        members = np.asarray(groups[g])
        val_rows += members[rng.permutation(members.size)[:counts[g]]].tolist()
    is_val = np.zeros(len(df), dtype=bool)
    is_val[val_rows] = True

    raw = _read_csv_text(train_csv)  # write the original cells back unchanged
    for path, rows in ((train_out, raw[~is_val]), (val_out, raw[is_val])):
        with atomic_write(path, "w") as f:
            rows.to_csv(f, index=False, lineterminator="\n")
    info.update({"train_sha256": sha256_file(train_out), "val_sha256": sha256_file(val_out),
                 "n_train": int((~is_val).sum()), "n_val": int(is_val.sum()),
                 "stratified_by_theme": theme_of is not None})
    atomic_save_json(info, info_path)
    return train_out, val_out


def _split_is_current(info: dict, train_out: Path, val_out: Path, info_path: Path) -> bool:
    try:
        old = json.loads(info_path.read_text(encoding="utf-8"))
        if any(old.get(k) != v for k, v in info.items() if k != "source_csv"):
            return False
        return sha256_file(train_out) == old["train_sha256"] and sha256_file(val_out) == old["val_sha256"]
    except (OSError, ValueError, KeyError, AttributeError):
        return False


# --------------------------------------------------------------------------- build_datasets

def _existing_csv(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{what} CSV {path} not found")
    return path


def resolve_csv_dir(dataset: str, path_to_save_csv: str | os.PathLike | None) -> Path | None:
    """The CSV folder that build_datasets expects, from ``--path_to_save_csv``; TAD66K also
    accepts the reference's ``.../merge/`` form (its parent holds ``unmerge/``)."""
    if not path_to_save_csv:
        return None
    folder = Path(path_to_save_csv)
    if dataset == "tad66k" and (folder / "train.csv").is_file() and (folder.parent / "unmerge").is_dir():
        return folder.parent
    return folder


def build_datasets(name: str, *, variant: str, image_dir: str | os.PathLike | None = None,
                   csv_dir: str | os.PathLike | None = None, validation: str = "split",
                   val_fraction: float = 0.1, seed: int = 0, score_range: Sequence[float] = (1.0, 10.0),
                   skip_bad: bool = False, train_csv: str | os.PathLike | None = None,
                   val_csv: str | os.PathLike | None = None, test_csv: str | os.PathLike | None = None,
                   split_dir: str | os.PathLike | None = None, allow_outside: bool = False,
                   demo_options: Mapping[str, Any] | None = None) -> dict[str, Dataset]:
    """{"train", "val", "test"} datasets for name "tad66k", "ava", "csv" (your own image,score CSVs)
    or "demo" (generated on first use).

    validation "split": val is a split carved off the training CSV (written to split_dir, default
    the training CSV's folder), or AVA's val.csv; "test": val is the test split (the reference's protocol).
    demo_options: keyword arguments of demo_data.ensure_demo_dataset (n_train, n_test, seed, size).
    """
    if name not in ("tad66k", "ava", "csv", "demo"):
        raise ValueError(f"dataset must be one of tad66k, ava, csv, demo; got {name!r}")
    if variant not in ("tad66k", "ava"):
        raise ValueError(f"variant must be 'tad66k' or 'ava', got {variant!r}")
    if validation not in ("split", "test"):
        raise ValueError(f"validation must be 'split' or 'test', got {validation!r}")
    if name != "ava" and variant == "ava":
        raise ValueError(f"the 'ava' variant needs vote distributions, which only the AVA data has; "
                         f"use variant 'tad66k' with dataset {name!r}")
    if name == "ava":
        return _build_ava(variant=variant, image_dir=image_dir, csv_dir=csv_dir, validation=validation,
                          skip_bad=skip_bad, train_csv=train_csv, val_csv=val_csv, test_csv=test_csv,
                          allow_outside=allow_outside)

    themes: dict[str, str] | None = None
    if name == "csv":
        if train_csv is None or test_csv is None:
            raise ValueError("dataset 'csv' needs train_csv and test_csv (val_csv is optional)")
        if image_dir is None:
            raise ValueError("dataset 'csv' needs image_dir, the folder the CSVs' image names are relative to")
        train_csv, test_csv = _existing_csv(Path(train_csv), "training"), _existing_csv(Path(test_csv), "test")
    else:
        if name == "demo":
            from demo_data import ensure_demo_dataset  # deferred: imports scikit-learn
            root = ensure_demo_dataset(csv_dir, **dict(demo_options or {}))
            image_dir = root / "images" if image_dir is None else image_dir
            score_range = (1.0, 10.0)
        else:
            root = Path(csv_dir) if csv_dir is not None else DEFAULT_TAD66K_DIR
            if image_dir is None:
                raise ValueError("dataset 'tad66k' needs image_dir, the folder of the TAD66K images")
        train_csv = _existing_csv(Path(train_csv) if train_csv is not None else root / "merge" / "train.csv",
                                  "training")
        test_csv = _existing_csv(Path(test_csv) if test_csv is not None else root / "merge" / "test.csv", "test")
        themes = read_theme_csvs(root / "unmerge" / "train", root / "unmerge" / "test")

    common = dict(themes=themes, score_range=score_range, skip_bad=skip_bad, allow_outside=allow_outside)
    if validation == "test":
        train_path, val_path = train_csv, test_csv
    elif val_csv is not None:
        train_path, val_path = train_csv, _existing_csv(Path(val_csv), "validation")
    else:
        out = Path(split_dir) if split_dir is not None else train_csv.parent
        train_path, val_path = make_validation_split(train_csv, out, fraction=val_fraction, seed=seed,
                                                     themes=themes, score_range=score_range)
    return {"train": ScoreImageDataset(train_path, image_dir, train=True, **common),
            "val": ScoreImageDataset(val_path, image_dir, train=False, **common),
            "test": ScoreImageDataset(test_csv, image_dir, train=False, **common)}


def _build_ava(*, variant: str, image_dir: str | os.PathLike | None, csv_dir: str | os.PathLike | None,
               validation: str, skip_bad: bool, train_csv: str | os.PathLike | None,
               val_csv: str | os.PathLike | None, test_csv: str | os.PathLike | None,
               allow_outside: bool) -> dict[str, Dataset]:
    if image_dir is None:
        raise ValueError("dataset 'ava' needs image_dir, the folder of the AVA <image_id>.jpg files")
    root = Path(csv_dir) if csv_dir is not None else DEFAULT_AVA_DIR
    train_path = Path(train_csv) if train_csv is not None else root / "train.csv"
    if not train_path.is_file():
        raise DataError(f"AVA training CSV {train_path} not found: the reference's AVA training CSV is not "
                        f"public; build it from AVA.txt with `python tools/make_ava_splits.py --ava_txt "
                        f"/path/to/AVA.txt --out_dir {root}` (or pass train_csv)")
    test_path = _existing_csv(Path(test_csv) if test_csv is not None else root / "test.csv", "AVA test")
    if validation == "test":
        val_path = test_path
    else:
        val_path = _existing_csv(Path(val_csv) if val_csv is not None else root / "val.csv", "AVA validation")
    common = dict(variant=variant, skip_bad=skip_bad, allow_outside=allow_outside)
    return {"train": AVADataset(train_path, image_dir, train=True, **common),
            "val": AVADataset(val_path, image_dir, train=False, **common),
            "test": AVADataset(test_path, image_dir, train=False, **common)}
