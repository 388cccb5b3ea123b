"""Finding the images to score: folders (links out of them refused, non-images listed), text and CSV
lists, and the shards of a collection (a SHA-1 of each path, the same on every machine).

No torch here.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePath

from PIL import Image

from imagedata.images import IMAGE_FORMATS, link_leaves_folder
from scoring.errors import ScoringError, ScoringWarning

LIST_SUFFIXES = (".txt", ".csv")


def image_extensions() -> frozenset[str]:
    """Lower-case file extensions Pillow registers for the formats ``load_image`` opens."""
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in IMAGE_FORMATS)


@dataclass(frozen=True)
class RefusedImage:
    """An image file that is not scored, and why (a symbolic link out of its folder); scoring it
    gives a result with this error."""

    path: str
    reason: str

    def __str__(self) -> str:
        return self.path


def _sniff(path: str) -> str | None:
    """The format of a file whose name does not say it is an image, when it is one we open."""
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as img:
            return img.format
    except Exception:  # noqa: BLE001 - anything Pillow cannot identify is not an image here
        return None


def scan_folder(folder: str | os.PathLike, *, recursive: bool = False, follow_symlinks: bool = False,
                skipped: list[tuple[str, str]] | None = None) -> list[str | RefusedImage]:
    """The images of a folder, sorted: files named like an image (any case), and files of another
    name that Pillow opens as one (a JPEG named ``.heic``); subfolders too when ``recursive``. Hidden
    files (``.name``, e.g. macOS ``._photo.jpg``) are left out; other files left out are appended to
    ``skipped`` as (path, why). A symbolic link to a file outside the folder is a ``RefusedImage``
    unless ``follow_symlinks``."""
    root = str(folder)
    real_root = os.path.realpath(root)
    extensions = image_extensions()
    found: list[str | RefusedImage] = []
    for here, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = os.path.join(here, name)
            if os.path.splitext(name)[1].lower() not in extensions and _sniff(path) is None:
                if skipped is not None:
                    skipped.append((path, "not an image this project reads (JPEG, PNG, BMP, GIF, TIFF, WebP, "
                                          "PPM, TGA, JPEG 2000)"))
                continue
            real = None if follow_symlinks or not os.path.islink(path) else link_leaves_folder(path, real_root)
            found.append(path if real is None else RefusedImage(
                path, f"image {path} is a symbolic link to {real}, outside the folder {root}; pass "
                      f"--follow_symlinks to score it"))
    return found


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ScoringError(f"image list {path} cannot be read: {exc}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ScoringError(f"image list {path}: line {line} is not valid UTF-8; save the file as UTF-8") from None


def images_in_text_list(path: str | os.PathLike, *, base: str | os.PathLike | None = None) -> list[str]:
    """The paths listed in a text file, one per line (blank lines and ``#`` comments skipped);
    relative paths are taken relative to ``base`` (default: the list file's folder)."""
    path = Path(path)
    folder = Path(base) if base is not None else path.parent
    names = [line.strip() for line in _read_text(path).splitlines()]
    names = [name for name in names if name and not name.startswith("#")]
    if not names:
        raise ScoringError(f"image list {path} lists no images")
    return [str(folder / name) for name in names]


def images_in_csv_list(path: str | os.PathLike, *, base: str | os.PathLike | None = None) -> list[str]:
    """The paths in the ``image`` column of a CSV; relative paths are taken relative to ``base``
    (default: the CSV's folder)."""
    path = Path(path)
    folder = Path(base) if base is not None else path.parent
    text = _read_text(path)
    try:
        rows = list(csv.reader(io.StringIO(text)))
    except csv.Error as exc:
        raise ScoringError(f"image list {path} is not a valid CSV: {exc}") from None
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if not rows:
        raise ScoringError(f"image list {path} is empty (no header, no rows)")
    header = [cell.strip() for cell in rows[0]]
    if "image" not in header:
        raise ScoringError(f"image list {path} has no 'image' column (columns: {', '.join(header) or 'none'})")
    column = header.index("image")
    names = []
    for number, row in enumerate(rows[1:], start=1):
        name = row[column].strip() if column < len(row) else ""
        if not name:
            raise ScoringError(f"image list {path}: row {number} has an empty image")
        names.append(str(folder / name))
    if not names:
        raise ScoringError(f"image list {path} has a header but no rows")
    return names


def collect_images(
    paths: Iterable[str | os.PathLike],
    *,
    recursive: bool = False,
    path_to_images: str | os.PathLike | None = None,
    follow_symlinks: bool = False,
    skipped: list[tuple[str, str]] | None = None,
    shard: tuple[int, int] | None = None,
) -> list[str | RefusedImage]:
    """Expand command-line paths into image paths, in order: a folder gives its images (``scan_folder``),
    a ``.txt`` or ``.csv`` file the images it lists (relative to ``path_to_images`` if given, else to
    the list's folder), anything else is taken as an image (a missing one fails when scored).
    ``shard`` (I, N): only the images of shard I of N (``shard_of`` of the path relative to
    its folder or list's base; an image given alone by its path as given)."""
    images: list[str | RefusedImage] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = scan_folder(path, recursive=recursive, follow_symlinks=follow_symlinks, skipped=skipped)
            if not found:
                hint = "" if recursive else " (add --recursive to look in subfolders)"
                warnings.warn(f"folder {path} holds no image files{hint}", ScoringWarning, stacklevel=2)
            root: str | None = str(path)
        elif path.suffix.lower() in LIST_SUFFIXES:
            if not path.is_file():
                raise ScoringError(f"image list {path} not found")
            reader = images_in_csv_list if path.suffix.lower() == ".csv" else images_in_text_list
            found = reader(path, base=path_to_images)
            root = str(path_to_images if path_to_images is not None else path.parent)
        else:
            found, root = [str(raw)], None
        if shard is not None:
            index, count = shard
            found = [image for image in found if shard_of(
                str(image) if root is None else os.path.relpath(str(image), root), count) == index]
        images += found
    return images


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
