"""Prepared-dataset cache: every image of a split decoded and resized once (the deterministic part
of the reference transform) into a uint8 memory-mapped file, and the batch augmentation that does
the rest (random flip, random crop, normalisation) on uint8 batches, on the training device.

A cache folder holds ``index.json`` (what it was built from: the CSV's sha256, the image paths with
their sizes and modification times, names, scores, targets and themes, the transform, versions),
``pixels.u8`` (uint8, shape (N, 3, H, W), C order) and ``progress.json`` (the chunks already built).
"""
from __future__ import annotations

import errno
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
import torchvision
from torch.utils.data import Dataset
from torchvision import transforms

from helpers.console import progress as progress_bar
from imagedata.images import DataError, EvalTransform, Resize, load_image
from helpers.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from helpers.preprocessing import INPUT_SIZE as MODEL_INPUT
from helpers.runtime import usable_cpus
from helpers.safe_io import atomic_save_json, sha256_file

logger = logging.getLogger(__name__)

CACHE_FORMAT = "tanet-cache/1"  # bump when the files' layout or meaning changes
INDEX_FILE, PIXELS_FILE, PROGRESS_FILE = "index.json", "pixels.u8", "progress.json"
DEFAULT_CHUNK = 128
_MAX_LISTED = 3


class CacheError(DataError):
    """A cache that cannot be used: missing, unfinished, or made by another format."""


class StaleCacheError(CacheError):
    """A cache built from other data or another transform than the dataset now has."""


# --------------------------------------------------------------------------- transform spec

@dataclass(frozen=True)
class CacheSpec:
    """What a cache stores and what is left for the batch augmentation."""

    resize: tuple[str, ...]  # repr of the deterministic transforms done once, at build time
    height: int  # stored image size
    width: int
    flip: bool  # random horizontal flip (p = 0.5) left for the batch augmentation
    crop: int | None  # random crop side left for the batch augmentation (None: no crop)

    @property
    def train(self) -> bool:
        return self.flip or self.crop is not None

    def as_json(self) -> dict:
        return {"resize": list(self.resize), "height": self.height, "width": self.width, "flip": self.flip,
                "crop": self.crop}


def _fixed_size(t: Any) -> tuple[int, int]:
    """(height, width) a resize transform always produces; ValueError if it depends on the image."""
    if isinstance(t, Resize):
        return int(t.size[0]), int(t.size[1])
    if isinstance(t, transforms.Resize) and isinstance(t.size, (list, tuple)) and len(t.size) == 2:
        return int(t.size[0]), int(t.size[1])
    raise ValueError(f"transform {t!r} cannot be cached: only resizes to a fixed (height, width) can")


def cache_spec(transform: Any) -> CacheSpec:
    """Split a reference transform into its cached part (leading fixed-size resizes) and the part
    the batch augmentation reproduces (RandomHorizontalFlip(0.5), RandomCrop(224), ToTensor,
    Normalize(ImageNet)); ValueError naming any transform outside that form."""
    if isinstance(transform, EvalTransform):  # its fixed resize, then ToTensor and ImageNet Normalize
        height, width = _fixed_size(transform.resize)
        if (height, width) != (MODEL_INPUT, MODEL_INPUT):
            raise ValueError(f"transform {transform!r} cannot be cached: it must give {MODEL_INPUT}x{MODEL_INPUT}")
        return CacheSpec((repr(transform.resize),), height, width, False, None)
    steps = list(getattr(transform, "transforms", [transform]))
    resize: list[Any] = []
    while steps and isinstance(steps[0], (transforms.Resize, Resize)):
        resize.append(steps.pop(0))
    if not resize:
        raise ValueError(f"transform {transform!r} cannot be cached: it does not start with a fixed-size resize")
    height, width = _fixed_size(resize[-1])
    flip, crop = False, None
    if steps and isinstance(steps[0], transforms.RandomHorizontalFlip):
        if steps[0].p != 0.5:
            raise ValueError(f"transform {steps[0]!r} cannot be cached: only p=0.5 flips are reproduced")
        flip = True
        steps.pop(0)
    if steps and isinstance(steps[0], transforms.RandomCrop):
        t = steps.pop(0)
        if t.padding is not None or t.pad_if_needed or tuple(t.size) != (MODEL_INPUT, MODEL_INPUT):
            raise ValueError(f"transform {t!r} cannot be cached: only RandomCrop({MODEL_INPUT}) without padding is "
                             f"reproduced")
        crop = MODEL_INPUT
    kinds = [type(t) for t in steps]
    if kinds != [transforms.ToTensor, transforms.Normalize] or tuple(steps[1].mean) != IMAGENET_MEAN \
            or tuple(steps[1].std) != IMAGENET_STD:
        raise ValueError(f"transform {transform!r} cannot be cached: after the resize it must be "
                         f"[RandomHorizontalFlip] [RandomCrop({MODEL_INPUT})] ToTensor Normalize(ImageNet)")
    if crop is None and (height, width) != (MODEL_INPUT, MODEL_INPUT):
        raise ValueError(f"transform {transform!r} cannot be cached: without a crop the resize must give "
                         f"{MODEL_INPUT}x{MODEL_INPUT}, not {height}x{width}")
    if crop is not None and (height < crop or width < crop):
        raise ValueError(f"transform {transform!r} cannot be cached: crop {crop} is larger than {height}x{width}")
    return CacheSpec(tuple(repr(t) for t in resize), height, width, flip, crop)


# --------------------------------------------------------------------------- fingerprint

def _image_dir(paths: Sequence[str], names: Sequence[str]) -> str:
    """The folder the names are relative to (the dataset builds path = join(folder, name))."""
    if not paths:
        return ""
    p, name = paths[0], names[0]
    return os.path.abspath(p[:len(p) - len(name)] if p.endswith(name) else os.path.dirname(p))


def _stat(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return int(st.st_size), int(st.st_mtime_ns)


def describe_dataset(dataset: Any) -> dict:
    """What a cache of this dataset is built from (JSON-able): the spec, the CSV's sha256, image
    folder, names, paths, file sizes and modification times, scores, targets and themes."""
    spec = cache_spec(dataset.transform)
    stats = [_stat(p) if os.path.isfile(p) else (-1, -1) for p in dataset.paths]
    return {
        "format": CACHE_FORMAT,
        "versions": {"pillow": PIL.__version__, "torchvision": torchvision.__version__.split("+")[0]},
        "transform": spec.as_json(),
        "skip_bad": bool(getattr(dataset, "skip_bad", False)),
        "shape": [len(dataset), 3, spec.height, spec.width],
        "dtype": "uint8",
        "source": {
            "csv": os.path.abspath(dataset.source),
            "csv_sha256": sha256_file(dataset.source),
            "image_dir": _image_dir(dataset.paths, dataset.names),
        },
        "names": list(dataset.names),
        "paths": [os.path.abspath(p) for p in dataset.paths],
        "sizes": [s for s, _ in stats],
        "mtimes_ns": [m for _, m in stats],
        "scores": [float(s) for s in dataset.scores],
        "targets": np.asarray(dataset.targets, dtype=np.float64).tolist(),
        "themes": list(dataset.themes),
    }


_BUILD_KEYS = ("format", "transform", "shape", "dtype", "source", "names", "paths", "sizes",
               "mtimes_ns", "scores", "targets", "themes")


def _listed(items: Sequence[str], n: int) -> str:
    return ", ".join(items[:_MAX_LISTED]) + (f" and {n - _MAX_LISTED} more" if n > _MAX_LISTED else "")


def _differences(old: dict, new: dict, rows: Sequence[int] | None = None) -> list[str]:
    """What changed between the index a cache was built from (old) and the dataset now (new),
    in words; rows: the positions in old of new's images (None: same order, same images)."""
    if old.get("format") != new["format"]:
        return [f"cache format {old.get('format')!r} (this code reads {new['format']!r})"]
    changes = []
    if old["transform"] != new["transform"]:
        changes.append(f"transform (cache: {old['transform']}; now: {new['transform']})")
    if old["source"]["csv_sha256"] != new["source"]["csv_sha256"]:
        was = "" if old["source"]["csv"] == new["source"]["csv"] else f" (cache built from {old['source']['csv']})"
        changes.append(f"CSV {new['source']['csv']} (content sha256 differs){was}")
    if old["source"]["image_dir"] != new["source"]["image_dir"]:
        changes.append(f"image folder {new['source']['image_dir']} (cache built from {old['source']['image_dir']})")
    if rows is None:
        if old["names"] != new["names"]:
            extra = [n for n in new["names"] if n not in set(old["names"])]
            changes.append(f"image list ({len(old['names'])} -> {len(new['names'])} images"
                           + (f"; new: {_listed(extra, len(extra))}" if extra else "") + ")")
            return changes
        rows = range(len(new["names"]))
    labels, files = [], []
    for i, r in enumerate(rows):
        name = new["names"][i]
        for key in ("score", "theme"):
            a, b = old[key + "s"][r], new[key + "s"][i]
            if a != b:
                labels.append(f"{key} of {name!r} is {b!r}, was {a!r}")
        if old["paths"][r] != new["paths"][i]:
            if old["source"]["image_dir"] == new["source"]["image_dir"]:  # else said once above
                files.append(f"{new['paths'][i]} (was {old['paths'][r]})")
        elif old["sizes"][r] != new["sizes"][i]:
            now = "missing" if new["sizes"][i] < 0 else f"{new['sizes'][i]} bytes"
            files.append(f"{new['paths'][i]} (size {old['sizes'][r]} -> {now})")
        elif old["mtimes_ns"][r] != new["mtimes_ns"][i]:
            files.append(f"{new['paths'][i]} (modified after the cache was built)")
    if labels:
        changes.append(f"labels: {_listed(labels, len(labels))}")
    if files:
        changes.append(f"image files: {_listed(files, len(files))}")
    return changes


# --------------------------------------------------------------------------- building

@dataclass
class BuildReport:
    """What one build_cache call did."""

    path: Path
    n_images: int
    n_chunks: int
    built: list[int] = field(default_factory=list)  # chunk ids built by this call
    reused: int = 0  # chunks already done by an earlier, interrupted call
    bad: dict[int, str] = field(default_factory=dict)  # row -> why it was skipped (skip_bad)
    seconds: float = 0.0


_worker: dict[str, Any] = {}


def _init_worker(pixels: str, paths: list[str], resize: Sequence[Any], shape: tuple[int, ...], skip_bad: bool) -> None:
    _worker.update(pixels=pixels, paths=paths, resize=transforms.Compose(list(resize)), shape=shape,
                   skip_bad=skip_bad)


def _build_chunk(job: tuple[int, int, int]) -> tuple[int, dict[int, str]]:
    """Decode, resize and store rows start..stop-1; the rows are on disk when it returns."""
    chunk, start, stop = job
    _, c, h, w = _worker["shape"]
    out = np.zeros((stop - start, c, h, w), dtype=np.uint8)
    bad: dict[int, str] = {}
    for row in range(start, stop):
        path = _worker["paths"][row]
        try:
            img = load_image(path)
        except DataError as exc:
            if not _worker["skip_bad"]:
                raise
            bad[row] = str(exc)
            continue
        pixels = np.asarray(_worker["resize"](img), dtype=np.uint8)
        if pixels.shape != (h, w, c):
            raise DataError(f"image file {path}: resize gave shape {pixels.shape}, expected {(h, w, c)}")
        out[row - start] = pixels.transpose(2, 0, 1)
    # pwrite, not a writable memmap: a full disk is an OSError here, not a SIGBUS that kills the worker
    fd = os.open(_worker["pixels"], os.O_WRONLY)
    try:
        data, offset = memoryview(out).cast("B"), start * c * h * w
        while data:
            written = os.pwrite(fd, data, offset)
            data, offset = data[written:], offset + written
        os.fsync(fd)
    finally:
        os.close(fd)
    return chunk, bad


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _same_build(old: dict | None, new: dict) -> bool:
    return old is not None and all(old.get(k) == new[k] for k in _BUILD_KEYS)


def build_cache(dataset: Any, out_dir: str | os.PathLike, *, chunk_size: int = DEFAULT_CHUNK,
                workers: int | None = None, progress: bool = True, command: str | None = None,
                on_chunk: Callable[[int], None] | None = None) -> BuildReport:
    """Build (or finish, or check) the cache of a dataset (ScoreImageDataset or AVADataset) in out_dir.

    Chunks of chunk_size images are decoded and resized by `workers` processes (default: all
    cores; 0: in this process) and recorded as done in progress.json once on disk, so an
    interrupted build resumes with the missing chunks only.  A cache of other data or another
    transform in out_dir is rebuilt from scratch.  command: the command line to quote in stale-cache
    messages.  on_chunk(chunk_id) is called after each chunk is recorded.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    index = describe_dataset(dataset)
    missing = [p for p, s in zip(index["paths"], index["sizes"]) if s < 0]
    if missing and not index["skip_bad"]:
        raise DataError(f"{len(missing)} image(s) listed in {dataset.source} are missing: "
                        f"{_listed(missing, len(missing))}")
    n, shape = len(dataset), tuple(index["shape"])
    n_chunks = -(-n // chunk_size)
    index.update(chunk_size=chunk_size, n_chunks=n_chunks, command=command or "tools/prepare_cache.py")
    pixels_path, progress_path, index_path = out / PIXELS_FILE, out / PROGRESS_FILE, out / INDEX_FILE

    old = _read_json(index_path)
    record = _read_json(progress_path)
    nbytes = int(np.prod(shape))
    resumable = (_same_build(old, index) and old.get("chunk_size") == chunk_size and record is not None
                 and pixels_path.is_file() and pixels_path.stat().st_size == nbytes)
    if resumable:
        done = {int(c) for c in record.get("done", [])}
        bad = {int(k): v for k, v in record.get("bad", {}).items()}
    else:
        if old is not None:
            why = "; ".join(_differences(old, index)) if old.get("format") == CACHE_FORMAT else "older format"
            logger.warning("rebuilding the cache in %s: %s", out, why or "unfinished build with other settings")
        progress_path.unlink(missing_ok=True)  # never pair an old progress record with new pixels
        index_path.unlink(missing_ok=True)
        _allocate(pixels_path, nbytes)
        atomic_save_json(index, index_path)
        done, bad = set(), {}
        atomic_save_json({"done": [], "bad": {}}, progress_path)
    report = BuildReport(out, n, n_chunks, reused=len(done))
    todo = [(c, c * chunk_size, min(n, (c + 1) * chunk_size)) for c in range(n_chunks) if c not in done]
    init = (str(pixels_path), index["paths"], _resize_steps(dataset.transform), shape, index["skip_bad"])
    bar = progress_bar(total=n, initial=n - sum(stop - start for _, start, stop in todo), unit="img",
                       desc=f"cache {out.name}", enabled=progress)

    def record_chunk(chunk: int, chunk_bad: dict[int, str]) -> None:
        done.add(chunk)
        bad.update(chunk_bad)
        atomic_save_json({"done": sorted(done), "bad": {str(k): v for k, v in sorted(bad.items())}}, progress_path)
        report.built.append(chunk)
        bar.update(min(n, (chunk + 1) * chunk_size) - chunk * chunk_size)
        if on_chunk is not None:
            on_chunk(chunk)

    try:
        if workers is None:
            workers = usable_cpus()
        if workers == 0 or len(todo) <= 1:
            _init_worker(*init)
            for job in todo:
                record_chunk(*_build_chunk(job))
        else:
            with _process_context().Pool(min(workers, len(todo)), _init_worker, init) as pool:
                for chunk, chunk_bad in pool.imap_unordered(_build_chunk, todo):
                    record_chunk(chunk, chunk_bad)
    finally:
        bar.close()
        _worker.clear()
    for row, why in sorted(bad.items()):
        logger.warning("skipped bad image %s: %s", index["paths"][row], why)
    report.bad = bad
    report.seconds = time.perf_counter() - started
    return report


def _allocate(path: Path, nbytes: int) -> None:
    """A file of nbytes zero bytes, its disk space reserved where the system can (CacheError if it cannot be)."""
    with open(path, "wb") as f:
        f.truncate(nbytes)
        if hasattr(os, "posix_fallocate") and nbytes:
            try:
                os.posix_fallocate(f.fileno(), 0, nbytes)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                    raise CacheError(f"not enough disk space for the cache {path}: it needs "
                                     f"{nbytes / 1e9:.2f} GB ({exc.strerror})") from None
                # EINVAL / EOPNOTSUPP: the file system cannot reserve space; the file stays sparse


def _process_context() -> multiprocessing.context.BaseContext:
    """forkserver where there is one (forking this process, which may run threads, can deadlock), else spawn."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["imagedata.cache"])  # the workers fork from a server that imported this module once
        return ctx
    return multiprocessing.get_context("spawn")


def _resize_steps(transform: Any) -> list[Any]:
    if isinstance(transform, EvalTransform):
        return [transform.resize]
    steps = list(getattr(transform, "transforms", [transform]))
    return steps[:len(cache_spec(transform).resize)]


# --------------------------------------------------------------------------- reading

def open_cache_index(cache_dir: str | os.PathLike) -> dict:
    """The index of a finished cache; CacheError if it is missing, of another format or unfinished."""
    folder = Path(cache_dir)
    index = _read_json(folder / INDEX_FILE)
    if index is None:
        raise CacheError(f"no cache in {folder} ({INDEX_FILE} missing or unreadable); build it with "
                         f"`python tools/prepare_cache.py ... --out {folder.parent}`")
    if index.get("format") != CACHE_FORMAT:
        raise StaleCacheError(f"cache {folder} has format {index.get('format')!r}, this code reads "
                              f"{CACHE_FORMAT!r}; rebuild it: {index.get('command', 'tools/prepare_cache.py')}")
    record = _read_json(folder / PROGRESS_FILE) or {}
    done = len(set(record.get("done", [])))
    if done != index["n_chunks"]:
        raise CacheError(f"cache {folder} is unfinished ({done} of {index['n_chunks']} chunks built; interrupted?); "
                         f"rerun the same command to finish it: {index['command']}")
    pixels = folder / PIXELS_FILE
    if not pixels.is_file() or pixels.stat().st_size != int(np.prod(index["shape"])):
        raise CacheError(f"cache {folder}: {PIXELS_FILE} is missing or has the wrong size; rebuild it: "
                         f"{index['command']}")
    index["bad_rows"] = {int(k): v for k, v in record.get("bad", {}).items()}
    return index


class CachedDataset(Dataset):
    """A ScoreImageDataset or AVADataset whose images come from its cache: the same items, except
    that ``image`` is the uint8 (3, H, W) image after the cached resize (augment_batch does the rest).

    Refuses (StaleCacheError, naming what changed) a cache built from another CSV, other labels,
    another image folder, other image files (size or modification time) or another transform.
    The dataset may be a subset of what the cache holds (e.g. after ``keep``); images are matched by name.
    """

    def __init__(self, dataset: Any, cache_dir: str | os.PathLike) -> None:
        self.dataset = dataset
        self.cache_dir = Path(cache_dir)
        index = open_cache_index(self.cache_dir)
        now = describe_dataset(dataset)
        row_of = {name: r for r, name in enumerate(index["names"])}
        absent = [name for name in now["names"] if name not in row_of]
        if absent:
            raise StaleCacheError(f"cache {self.cache_dir} is stale: {len(absent)} image(s) of {dataset.source} are "
                                  f"not in it ({_listed(absent, len(absent))}); rebuild it: {index['command']}")
        self.rows = np.array([row_of[name] for name in now["names"]], dtype=np.int64)
        changes = _differences(index, now, self.rows.tolist())
        if changes:
            raise StaleCacheError(f"cache {self.cache_dir} is stale: changed since it was built: "
                                  f"{'; '.join(changes)}; rebuild it: {index['command']}")
        self.spec = CacheSpec(tuple(index["transform"]["resize"]), index["transform"]["height"],
                              index["transform"]["width"], index["transform"]["flip"], index["transform"]["crop"])
        self.shape = tuple(index["shape"])
        self.bad_rows = index["bad_rows"]
        if index["versions"]["pillow"] != PIL.__version__:
            logger.warning("cache %s was built with Pillow %s, this is Pillow %s: resized pixels may differ "
                           "slightly from decoding now", self.cache_dir, index["versions"]["pillow"], PIL.__version__)
        self._pixels: np.ndarray | None = None

    # the uncached dataset's attributes that the scripts use
    names = property(lambda self: self.dataset.names)
    paths = property(lambda self: self.dataset.paths)
    source = property(lambda self: self.dataset.source)
    train = property(lambda self: self.spec.train)

    def _open(self) -> np.ndarray:
        if self._pixels is None:  # opened lazily: once per DataLoader worker
            self._pixels = np.memmap(self.cache_dir / PIXELS_FILE, dtype=np.uint8, mode="r", shape=self.shape)
        return self._pixels

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pixels": None}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        row = int(self.rows[index])
        path = self.dataset.paths[index]
        if row in self.bad_rows:  # undecodable, found at build time: what the uncached dataset does with it
            if not self.dataset.skip_bad:
                raise DataError(self.bad_rows[row])
            logger.warning("skipping bad image %s (listed in %s): %s", path, self.dataset.source, self.bad_rows[row])
            return None
        image = torch.from_numpy(np.array(self._open()[row]))
        return {"image": image, "target": torch.from_numpy(self.dataset.targets[index].copy()),
                "score": float(self.dataset.scores[index]), "theme": self.dataset.themes[index], "index": int(index),
                "path": path}

    def keep(self, mask: Sequence[bool] | np.ndarray) -> None:
        """Keep only the rows where mask is True (in place), in the dataset too."""
        m = np.asarray(mask, dtype=bool)
        self.dataset.keep(m)
        self.rows = self.rows[m]

    def __repr__(self) -> str:
        return f"CachedDataset({len(self)} images of {self.dataset.source} from {self.cache_dir})"

