"""Shared helpers: evaluation metrics, EMD losses, atomic/safe file I/O, downloads,
run-folder locking, seeding, device choice and RNG state capture.

This is the bottom layer of the repo: it imports nothing of ours.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import math
import os
import pathlib
import random
import re
import socket
import sys
import uuid
import warnings
from collections.abc import Iterator, Sequence
from typing import IO, Any

import numpy as np
import requests
import scipy.stats
import torch
from tqdm import tqdm

PathLike = str | os.PathLike

NUM_BINS = 10  # AVA score distributions: votes for scores 1..10

__all__ = [
    "srcc", "plcc", "accuracy", "mse", "emd", "emd_loss", "emd_loss_reference",
    "distribution_mean", "distribution_std", "srcc_accuracy_ratio", "per_theme_metrics",
    "evaluation_metrics",
    "atomic_write", "atomic_save_json", "atomic_torch_save", "remove_stale_temp_files",
    "CheckpointError", "UnsafeCheckpointError", "safe_torch_load", "sha256_file",
    "DownloadError", "download",
    "RunLockedError", "RunLock",
    "seed_everything", "resolve_device", "capture_rng_state", "restore_rng_state",
]


# --------------------------------------------------------------------------- metrics

def _as_array(x: Any, name: str) -> np.ndarray:
    """Any of list / numpy / torch -> float64 numpy array (a copy detached from autograd)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: expected numbers, got {type(x).__name__} ({exc})") from None


def _scores(x: Any, name: str) -> np.ndarray:
    """One score per image: shape (N,) or (N, 1) -> (N,)."""
    a = _as_array(x, name)
    if a.ndim == 0:
        a = a.reshape(1)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise ValueError(f"{name}: expected one score per image, shape (N,) or (N, 1), got {a.shape}")
    return a


def _score_pair(pred: Any, true: Any) -> tuple[np.ndarray, np.ndarray]:
    p, t = _scores(pred, "pred"), _scores(true, "true")
    if p.shape != t.shape:
        raise ValueError(f"pred has {p.size} scores but true has {t.size}")
    return p, t


def _warn_nan(metric: str, reason: str) -> float:
    warnings.warn(f"{metric} is undefined ({reason}); returning NaN", RuntimeWarning, stacklevel=3)
    return float("nan")


def _nonfinite_reason(*arrays: np.ndarray) -> str | None:
    for a in arrays:
        if not np.all(np.isfinite(a)):
            return "input contains NaN or infinite values"
    return None


def _correlation_undefined(p: np.ndarray, t: np.ndarray) -> str | None:
    """Why a correlation of p and t cannot be computed, or None when it can."""
    if p.size < 2:
        return f"needs at least 2 items, got {p.size}"
    reason = _nonfinite_reason(p, t)
    if reason:
        return reason
    if np.all(p == p[0]):
        return "predictions are constant"
    if np.all(t == t[0]):
        return "ground-truth scores are constant"
    return None


def _srcc(p: np.ndarray, t: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # we report undefined cases ourselves
        return float(scipy.stats.spearmanr(p, t)[0])


def _plcc(p: np.ndarray, t: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(scipy.stats.pearsonr(p, t)[0])


def srcc(pred: Any, true: Any) -> float:
    """Spearman rank correlation; NaN (with one RuntimeWarning) when undefined."""
    p, t = _score_pair(pred, true)
    reason = _correlation_undefined(p, t)
    return _warn_nan("SRCC", reason) if reason else _srcc(p, t)


def plcc(pred: Any, true: Any) -> float:
    """Pearson linear correlation; NaN (with one RuntimeWarning) when undefined."""
    p, t = _score_pair(pred, true)
    reason = _correlation_undefined(p, t)
    return _warn_nan("PLCC", reason) if reason else _plcc(p, t)


def accuracy(pred: Any, true: Any, threshold: float = 5.0) -> float:
    """Binary accuracy: fraction of images where pred and true agree on "good" (score > threshold)."""
    p, t = _score_pair(pred, true)
    if p.size == 0:
        return _warn_nan("accuracy", "no images")
    reason = _nonfinite_reason(p, t)
    if reason:
        return _warn_nan("accuracy", reason)
    return float(np.mean((p > threshold) == (t > threshold)))


def mse(pred: Any, true: Any) -> float:
    """Mean squared error of the scores."""
    p, t = _score_pair(pred, true)
    if p.size == 0:
        return _warn_nan("MSE", "no images")
    reason = _nonfinite_reason(p, t)
    if reason:
        return _warn_nan("MSE", reason)
    return float(np.mean((p - t) ** 2))


def _distribution_pair(p: Any, q: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_array(p, "p"), _as_array(q, "q")
    if a.ndim == 1:
        a = a[None, :]
    if b.ndim == 1:
        b = b[None, :]
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"p and q must both be (N, bins) distributions, got {a.shape} and {b.shape}")
    return a, b


def emd(p: Any, q: Any, r: float = 1) -> float:
    """Earth mover's distance, NIMA form: per image (mean_k |CDF_p - CDF_q|^r)^(1/r), averaged over images."""
    if r <= 0:
        raise ValueError(f"emd: r must be > 0, got {r}")
    a, b = _distribution_pair(p, q)
    if a.shape[0] == 0:
        return _warn_nan("EMD", "no images")
    reason = _nonfinite_reason(a, b)
    if reason:
        return _warn_nan("EMD", reason)
    diff = np.abs(np.cumsum(a, axis=1) - np.cumsum(b, axis=1))
    per_image = np.mean(diff ** r, axis=1) ** (1.0 / r)
    return float(np.mean(per_image))


def _safe_root(x: torch.Tensor, r: float) -> torch.Tensor:
    """x ** (1/r) with a zero (not NaN) gradient where x == 0 (e.g. a perfect prediction)."""
    if r == 1:
        return x
    positive = x > 0
    safe = torch.where(positive, x, torch.ones_like(x))
    return torch.where(positive, safe ** (1.0 / r), torch.zeros_like(x))


def _torch_distribution_pair(p: torch.Tensor, q: torch.Tensor) -> None:
    if not isinstance(p, torch.Tensor) or not isinstance(q, torch.Tensor):
        raise TypeError("emd_loss expects torch tensors")
    if p.dim() != 2 or p.shape != q.shape:
        raise ValueError(f"p and q must both be (B, bins) tensors, got {tuple(p.shape)} and {tuple(q.shape)}")


def emd_loss(p: torch.Tensor, q: torch.Tensor, r: float = 2) -> torch.Tensor:
    """Differentiable NIMA EMD: per image (mean_k |CDF_p - CDF_q|^r)^(1/r), mean over the batch."""
    if r <= 0:
        raise ValueError(f"emd_loss: r must be > 0, got {r}")
    _torch_distribution_pair(p, q)
    diff = torch.abs(torch.cumsum(p, dim=1) - torch.cumsum(q, dim=1))
    per_image = _safe_root(torch.mean(diff ** r, dim=1), r)
    return per_image.mean()


def emd_loss_reference(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The reference TANet r=2 training loss: sqrt(mean over batch AND bins of (CDF_p - CDF_q)^2).

    Reference quirk: the root is taken once over the whole batch, not per image, so this is
    NOT the NIMA EMD of `emd_loss(p, q, r=2)` (which takes the root per image, then averages).
    For one image the two agree.
    """
    _torch_distribution_pair(p, q)
    diff = torch.cumsum(p, dim=1) - torch.cumsum(q, dim=1)
    return _safe_root(torch.mean(diff ** 2), 2)


def distribution_mean(p: Any) -> Any:
    """Mean score sum_k k * p_k (k = 1..10) along the last axis; torch in -> torch out, else numpy."""
    if isinstance(p, torch.Tensor):
        if p.shape[-1:] != (NUM_BINS,):
            raise ValueError(f"distribution_mean: last dimension must be {NUM_BINS}, got shape {tuple(p.shape)}")
        x = p if p.is_floating_point() else p.float()
        k = torch.arange(1, NUM_BINS + 1, dtype=x.dtype, device=x.device)
        return (x * k).sum(dim=-1)
    a = _as_array(p, "p")
    if a.shape[-1:] != (NUM_BINS,):
        raise ValueError(f"distribution_mean: last dimension must be {NUM_BINS}, got shape {a.shape}")
    return a @ np.arange(1, NUM_BINS + 1, dtype=np.float64)


def distribution_std(p: Any) -> Any:
    """Standard deviation sqrt(sum_k p_k (k - mean)^2) (k = 1..10) along the last axis."""
    mean = distribution_mean(p)
    if isinstance(p, torch.Tensor):
        x = p if p.is_floating_point() else p.float()
        k = torch.arange(1, NUM_BINS + 1, dtype=x.dtype, device=x.device)
        return torch.sqrt((x * (k - mean.unsqueeze(-1)) ** 2).sum(dim=-1))
    a = _as_array(p, "p")
    k = np.arange(1, NUM_BINS + 1, dtype=np.float64)
    return np.sqrt((a * (k - np.expand_dims(mean, -1)) ** 2).sum(axis=-1))


def srcc_accuracy_ratio(srcc_value: float, accuracy_value: float) -> float:
    """SRCC / accuracy (a paper metric for AVA); NaN when either is NaN or accuracy is 0."""
    s, a = float(srcc_value), float(accuracy_value)
    if math.isnan(s) or math.isnan(a):
        return float("nan")
    if a == 0:
        return _warn_nan("SRCC/accuracy ratio", "accuracy is 0")
    return s / a


def _is_blank_theme(theme: Any) -> bool:
    if theme is None:
        return True
    if isinstance(theme, float) and math.isnan(theme):  # empty CSV cell read by pandas
        return True
    return str(theme).strip() == ""


def per_theme_metrics(pred: Any, true: Any, themes: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """Per theme {"srcc", "plcc", "n"}, sorted by theme name; undefined ones are NaN with one warning per theme."""
    p, t = _score_pair(pred, true)
    theme_list = [str(x) for x in (themes.tolist() if hasattr(themes, "tolist") else themes)]
    if len(theme_list) != p.size:
        raise ValueError(f"themes has {len(theme_list)} entries but there are {p.size} scores")
    groups: dict[str, list[int]] = {}
    for i, theme in enumerate(theme_list):
        groups.setdefault(theme, []).append(i)
    result: dict[str, dict[str, Any]] = {}
    for theme in sorted(groups):
        idx = np.asarray(groups[theme])
        tp, tt = p[idx], t[idx]
        reason = _correlation_undefined(tp, tt)
        if reason:
            warnings.warn(f"SRCC/PLCC of theme {theme!r} are undefined ({reason}); returning NaN",
                          RuntimeWarning, stacklevel=2)
            s = c = float("nan")
        else:
            s, c = _srcc(tp, tt), _plcc(tp, tt)
        result[theme] = {"srcc": s, "plcc": c, "n": int(idx.size)}
    return result


def evaluation_metrics(pred: Any, true: Any, *, threshold: float, pred_dist: Any = None,
                       true_dist: Any = None, themes: Sequence[Any] | None = None) -> dict[str, Any]:
    """All test metrics as plain JSON-serialisable Python numbers (NaN stays NaN).

    Always: srcc, plcc, accuracy, mse, n_images. With pred_dist and true_dist: emd (r=1) and
    srcc_accuracy_ratio. With themes: per_theme (blank themes are left out).
    """
    p, t = _score_pair(pred, true)
    out: dict[str, Any] = {
        "srcc": srcc(p, t),
        "plcc": plcc(p, t),
        "accuracy": accuracy(p, t, threshold=threshold),
        "mse": mse(p, t),
        "n_images": int(p.size),
    }
    if (pred_dist is None) != (true_dist is None):
        raise ValueError("evaluation_metrics: give both pred_dist and true_dist, or neither")
    if pred_dist is not None:
        a, b = _distribution_pair(pred_dist, true_dist)
        if a.shape[0] != p.size:
            raise ValueError(f"pred_dist has {a.shape[0]} rows but there are {p.size} scores")
        out["emd"] = emd(a, b, r=1)
        out["srcc_accuracy_ratio"] = srcc_accuracy_ratio(out["srcc"], out["accuracy"])
    if themes is not None:
        theme_list = list(themes.tolist() if hasattr(themes, "tolist") else themes)
        if len(theme_list) != p.size:
            raise ValueError(f"themes has {len(theme_list)} entries but there are {p.size} scores")
        keep = [i for i, th in enumerate(theme_list) if not _is_blank_theme(th)]
        out["per_theme"] = per_theme_metrics(p[keep], t[keep], [theme_list[i] for i in keep])
    return out


# --------------------------------------------------------------------------- atomic I/O

def _temp_path_beside(path: pathlib.Path, suffix: str) -> pathlib.Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{suffix}")


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Yield a file on a temp file beside `path`; on success fsync + rename onto `path`.

    If the body raises, the temp file is removed and `path` is left untouched.
    Creates the parent folder if needed. `mode` is "wb" or "w" (UTF-8 text).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode must be 'wb' or 'w', got {mode!r}")
    target = pathlib.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path_beside(target, ".tmp")
    # 0o666 so the usual umask applies, as for a plain open()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable; not possible everywhere
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_save_json(obj: Any, path: PathLike) -> None:
    """Write `obj` as indented JSON (NaN allowed), atomically."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """torch.save `obj` to `path`, atomically."""
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


_TEMP_NAME = re.compile(r"\..+\.[0-9a-f]{12}\.tmp")  # what _temp_path_beside makes


def remove_stale_temp_files(folder: PathLike) -> list[pathlib.Path]:
    """Delete the temp files of atomic writes that a killed process left in `folder`; returns them.

    Call it only while holding the folder's RunLock: nobody else can be writing there then.
    """
    removed = []
    for p in sorted(pathlib.Path(folder).glob(".*.tmp")):
        if _TEMP_NAME.fullmatch(p.name) and p.is_file():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


# --------------------------------------------------------------------------- checkpoints

class CheckpointError(ValueError):
    """A checkpoint file is missing, empty, truncated or not a PyTorch file."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint needs full (code-executing) unpickling and no opt-in was given."""


# Phrases of torch's weights-only unpickler meaning "valid pickle, but it references code".
_UNSAFE_MARKERS = ("Unsupported global", "Unsupported class", "not an allowed global",
                   "unrecognized function", "Unsupported reduce")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    line = text.splitlines()[0].strip()
    return line if len(line) <= 200 else line[:197] + "..."


def _weights_only_failure(exc: BaseException) -> tuple[bool, str]:
    """(needs_unsafe, short cause) for an exception of torch.load(weights_only=True)."""
    texts = [str(exc)]
    if exc.__context__ is not None:
        texts.append(str(exc.__context__))
    joined = "\n".join(texts)
    if any(m in joined for m in _UNSAFE_MARKERS):
        found = re.search(r"GLOBAL ([\w.]+)", joined) or re.search(r"Unsupported class ([\w.]+)", joined)
        return True, (found.group(1) if found else "")
    inner = exc.__context__ if exc.__context__ is not None and "Weights only load failed" in texts[0] else exc
    return False, f"{type(inner).__name__}: {_first_line(inner)}"


def safe_torch_load(path: PathLike, *, allow_unsafe: bool = False, map_location: Any = "cpu") -> Any:
    """torch.load with weights_only=True; clear CheckpointError for any unreadable file.

    A file that needs full unpickling raises UnsafeCheckpointError unless allow_unsafe=True,
    in which case it is loaded with weights_only=False after a warning.
    """
    p = pathlib.Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} not found")
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} is not a file")
    if p.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {p} is empty (0 bytes)")
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        needs_unsafe, cause = _weights_only_failure(exc)
        if not needs_unsafe:
            raise CheckpointError(f"checkpoint {p} is not a readable PyTorch file "
                                  f"(truncated or wrong format?): {cause}") from None
    if not allow_unsafe:
        what = f" (it references {cause})" if cause else ""
        raise UnsafeCheckpointError(
            f"checkpoint {p} contains pickled Python objects that can run arbitrary code when loaded{what}; "
            f"it can only be loaded with the explicit opt-in --allow_unsafe_load, and only from a trusted source")
    warnings.warn(f"--allow_unsafe_load: unpickling {p} with weights_only=False, which can execute "
                  f"arbitrary code; do this only for files from a trusted source", UserWarning, stacklevel=2)
    try:
        return torch.load(p, map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {p} could not be loaded: {type(exc).__name__}: "
                              f"{_first_line(exc)}") from None


def sha256_file(path: PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- download

class DownloadError(RuntimeError):
    """A download failed; no file was written at its destination."""


def _check_sha256_arg(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    s = sha256.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", s):
        raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
    return s


def download(url: str, dest: PathLike, *, sha256: str | None = None, timeout: float = 30.0,
             progress: bool = True, chunk_size: int = 1 << 20) -> pathlib.Path:
    """Stream `url` to `dest` (TLS verified), renaming into place only once complete and verified.

    Prints the SHA-256 of the downloaded bytes to stderr. Any failure raises DownloadError naming
    the URL and leaves neither `dest` (if it was absent) nor a temp file behind.
    """
    expected = _check_sha256_arg(sha256)
    target = pathlib.Path(dest)
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    try:
        # (connect, read) timeout: a server that accepts but never answers fails after `timeout` s.
        with requests.get(url, stream=True, timeout=(timeout, timeout)) as resp:
            if resp.status_code >= 400:
                raise DownloadError(f"download of {url} failed: HTTP {resp.status_code} {resp.reason}")
            length = resp.headers.get("Content-Length")
            identity = resp.headers.get("Content-Encoding", "identity").lower() in ("", "identity")
            total = int(length) if length and length.isdigit() and identity else None
            received = 0
            with atomic_write(target, "wb") as f, tqdm(
                    total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=target.name,
                    file=sys.stderr, disable=not progress) as bar:
                for chunk in resp.iter_content(chunk_size=chunk_size):
                    f.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
                if total is not None and received != total:
                    raise DownloadError(f"download of {url} was cut off: got {received} of {total} bytes")
                got = digest.hexdigest()
                if expected is not None and got != expected:
                    raise DownloadError(f"download of {url} failed the checksum: expected sha256 "
                                        f"{expected}, got {got}")
    except DownloadError:
        raise
    except requests.exceptions.Timeout as exc:
        raise DownloadError(f"download of {url} timed out after {timeout} s ({type(exc).__name__})") from None
    except requests.exceptions.SSLError as exc:
        raise DownloadError(f"download of {url} failed: the server's TLS certificate could not be verified "
                            f"(it stays refused; fix the server or your CA certificates): {_first_line(exc)}") from None
    except requests.exceptions.ChunkedEncodingError as exc:
        raise DownloadError(f"download of {url} was cut off: {_first_line(exc)}") from None
    except requests.exceptions.ConnectionError as exc:
        raise DownloadError(f"download of {url} failed: could not connect or the connection broke "
                            f"(offline?): {_first_line(exc)}") from None
    except requests.exceptions.RequestException as exc:
        raise DownloadError(f"download of {url} failed: {type(exc).__name__}: {_first_line(exc)}") from None
    except OSError as exc:
        raise DownloadError(f"download of {url} failed writing {target}: {_first_line(exc)}") from None
    print(f"sha256 {digest.hexdigest()}  {target}", file=sys.stderr)
    return target


# --------------------------------------------------------------------------- run-folder lock

class RunLockedError(RuntimeError):
    """Another live process holds the lock of a run folder."""


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C there; assume alive (user can delete the lock)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return False
    return True


class RunLock:
    """Exclusive lock on a run folder via `folder/.lock` (pid and hostname), created atomically.

    A lock left by a dead process on this host is taken over with a warning.
    """

    def __init__(self, folder: PathLike) -> None:
        self.folder = pathlib.Path(folder)
        self.path = self.folder / ".lock"
        self._content = f"{os.getpid()}\n{socket.gethostname()}\n"
        self._held = False

    def _read_holder(self) -> tuple[int, str] | None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        lines = text.split("\n")
        try:
            return int(lines[0]), lines[1].strip()
        except (ValueError, IndexError):
            raise RunLockedError(
                f"run folder {self.folder} has an unreadable lock file {self.path} ({text[:40]!r}); "
                f"if no other run uses this folder, delete the lock file") from None

    def acquire(self) -> "RunLock":
        """Take the lock or raise RunLockedError."""
        if self._held:
            raise RuntimeError(f"RunLock on {self.folder} is already held by this object")
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._read_holder()
                if holder is None:  # released between our open and read: retry
                    continue
                pid, host = holder
                if host != socket.gethostname():
                    raise RunLockedError(
                        f"run folder {self.folder} is locked by pid {pid} on host {host}; cannot check "
                        f"that host, so if no run is active there delete {self.path}")
                if _pid_alive(pid):
                    raise RunLockedError(f"run folder {self.folder} is in use by another run (pid {pid}, lock "
                                         f"file {self.path}); wait for it to finish or use another folder")
                warnings.warn(f"taking over stale lock {self.path} of dead process {pid}",
                              RuntimeWarning, stacklevel=2)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                continue
            try:
                os.write(fd, self._content.encode("utf-8"))
            finally:
                os.close(fd)
            self._held = True
            return self
        raise RunLockedError(f"could not acquire the lock {self.path} (contended)")

    def release(self) -> None:
        """Remove the lock file if this object holds it."""
        if not self._held:
            return
        self._held = False
        try:
            if self.path.read_text(encoding="utf-8") == self._content:
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()


# --------------------------------------------------------------------------- seeding, devices, RNG state

def seed_everything(seed: int) -> None:
    """Seed python's random, numpy's global RNG and torch (CPU and all CUDA devices)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2 ** 32:
        raise ValueError(f"--seed must be an integer in [0, 2**32), got {seed!r}")
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' (cuda if available, else cpu), 'cpu', 'cuda' or 'cuda:N' -> torch.device."""
    choice = str(name).strip().lower()
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", choice)
    if not m:
        raise ValueError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name!r} asks for CUDA, but CUDA is not available here; use --device cpu")
    if m.group(1) is not None:
        index, count = int(m.group(1)), torch.cuda.device_count()
        if index >= count:
            raise ValueError(f"--device {name!r}: there are only {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
        return torch.device("cuda", index)
    return torch.device("cuda")


ALLOCATORS = ("tuned", "system")
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def tune_cpu_allocator() -> bool:
    """Keep freed memory in the process for the next step (glibc: no mmap for large blocks, no trimming).

    By default glibc hands every block over 32 MB (a 40-image activation map is 64-128 MB) to a fresh
    ``mmap`` and unmaps it when freed, so every step page-faults (and zeroes) gigabytes anew: on the
    CPU that system time costs the float32 model half of its speed. True when applied (Linux, glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU, and CUDA when available) RNG states, loadable with weights_only=True."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": int(version), "internal": [int(x) for x in internal], "gauss_next": gauss_next},
        "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore what capture_rng_state() returned (CUDA states only if CUDA is available)."""
    try:
        py, npy, cpu = state["python"], state["numpy"], state["torch"]
        random.setstate((int(py["version"]), tuple(int(x) for x in py["internal"]), py["gauss_next"]))
        keys = npy["keys"]
        keys = keys.cpu().numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
        np.random.set_state((str(npy["name"]), keys.astype(np.uint32), int(npy["pos"]),
                             int(npy["has_gauss"]), float(npy["cached_gaussian"])))
        torch.set_rng_state(cpu.cpu().to(torch.uint8))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"invalid RNG state in checkpoint: {type(exc).__name__}: {exc}") from None
    cuda_states = state.get("cuda")
    if cuda_states and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if len(cuda_states) != count:
            warnings.warn(f"checkpoint has RNG states for {len(cuda_states)} CUDA devices, this machine has "
                          f"{count}; restoring the first {min(count, len(cuda_states))}", RuntimeWarning,
                          stacklevel=2)
        for i, s in enumerate(cuda_states[:count]):
            torch.cuda.set_rng_state(s.cpu().to(torch.uint8), device=i)
