"""Files that are never left half-written and never run code: atomic writes, the clean-up of an
interrupted write's temp files, weights-only checkpoint loading, file digests, CSV cells safe in a
spreadsheet.

A bottom-layer helper: it imports nothing of ours.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import math
import os
import pathlib
import pickletools
import re
import shutil
import uuid
import warnings
import zipfile
from collections.abc import Callable, Iterator
from typing import IO, Any

PathLike = str | os.PathLike

__all__ = [
    "atomic_write", "atomic_save_json", "json_text", "atomic_torch_save", "DiskFullError", "disk_full_error",
    "remove_stale_temp_files",
    "CheckpointError", "UnsafeCheckpointError", "safe_torch_load", "sha256_file", "csv_text_cell", "csv_text_value",
]


def _temp_path_beside(path: pathlib.Path, suffix: str) -> pathlib.Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{suffix}")


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb", *, sync: bool = True) -> Iterator[IO[Any]]:
    """Yield a file on a temp file beside `path`; on success fsync + rename onto `path`.

    If the body raises, the temp file is removed and `path` is left untouched.
    Creates the parent folder if needed. `mode` is "wb" or "w" (UTF-8 text). ``sync=False`` skips the
    fsyncs: a killed process still leaves the old file or the new one, a power loss may not.
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
            if sync:
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if not sync:
        return
    with contextlib.suppress(OSError):  # make the rename durable; not possible everywhere
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _finite_or_none(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def json_text(obj: Any, *, indent: int | None = None, sort_keys: bool = False, ensure_ascii: bool = True,
              default: Callable[[Any], Any] | None = None) -> str:
    """`obj` as strict JSON (RFC 8259, which has no NaN or Infinity): a non-finite float is written as
    null (an undefined value: whoever records one says why beside it); what JSON cannot hold, a TypeError
    (or what ``default`` makes of it, as for json.dumps)."""
    return json.dumps(_finite_or_none(obj), indent=indent, sort_keys=sort_keys, ensure_ascii=ensure_ascii,
                      allow_nan=False, default=default)


class DiskFullError(OSError):
    """An atomic write that found no space left on its device (ENOSPC, EDQUOT): the message, one line,
    names the file, its folder, the space it needs and the space free there."""

    def __str__(self) -> str:
        return str(self.strerror)


def _disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc``, or one it was raised while handling, says the disk is full (torch.save reports a
    full disk as "unexpected pos", raised while handling the OSError)."""
    for _ in range(8):
        if exc is None:
            return False
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__context__
    return False


def disk_full_error(path: PathLike, needed: int) -> DiskFullError:
    """The DiskFullError of writing ``needed`` bytes to ``path``."""
    target = pathlib.Path(path)
    try:
        free = f", {shutil.disk_usage(target.parent).free / 1e6:.1f} MB free"
    except OSError:
        free = ""
    return DiskFullError(errno.ENOSPC, f"no space left on the device of {target.parent}: {target.name} needs "
                                       f"{needed / 1e6:.1f} MB{free}")


class _ByteCounter:
    """A write-only file that counts the bytes written to it."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: Any) -> int:
        n = memoryview(data).nbytes
        self.size += n
        return n

    def flush(self) -> None:
        pass


def atomic_save_json(obj: Any, path: PathLike) -> None:
    """Write `obj` as indented strict JSON (``json_text``: NaN as null), atomically; DiskFullError on a full disk."""
    text = json_text(obj, indent=2) + "\n"
    try:
        with atomic_write(path, "w") as f:
            f.write(text)
    except OSError as exc:
        if not _disk_full(exc):
            raise
        raise disk_full_error(path, len(text.encode("utf-8"))) from None


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """torch.save `obj` to `path`, atomically; DiskFullError on a full disk."""
    import torch  # here, not above: the atomic writes serve torch-free scoring too

    try:
        with atomic_write(path, "wb") as f:
            torch.save(obj, f)
    except (OSError, RuntimeError) as exc:
        if not _disk_full(exc):
            raise
        counter = _ByteCounter()
        torch.save(obj, counter)
        raise disk_full_error(path, counter.size) from None


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
                   "unrecognized function", "Unsupported reduce", "unsupported GLOBAL", "is blocked")
_MAX_PICKLE = 64 << 20  # bytes of a pickle stream scanned for what it references


def _pickle_stream(path: pathlib.Path) -> bytes:
    """The object pickle of a checkpoint: ``data.pkl`` of a zip (PyTorch's format), else the file's start."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
            return z.read(name)[:_MAX_PICKLE] if name is not None else b""
    with open(path, "rb") as f:
        return f.read(_MAX_PICKLE)


def referenced_globals(path: PathLike) -> list[str] | None:
    """The importable names (``module.name``) a checkpoint's pickle would look up when fully unpickled,
    read without unpickling it; None when the stream is not a complete pickle (truncated, not a pickle)."""
    found: list[str] = []
    pushed: list[object] = []  # the last values pushed, as far as names go (strings, or None)
    memo: dict[int, object] = {}
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(_pickle_stream(pathlib.Path(path)))):
            name = op.name
            if name in ("GLOBAL", "INST"):
                found.append(str(arg).replace(" ", "."))
            elif name == "STACK_GLOBAL":
                module, qualname = (pushed[-2:] + [None, None])[:2] if len(pushed) >= 2 else (None, None)
                found.append(f"{module}.{qualname}" if isinstance(module, str) and isinstance(qualname, str)
                             else "(a name built at load time)")
            if name == "STOP":
                return found
            if name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
                memo[len(memo) if name == "MEMOIZE" else int(arg)] = pushed[-1] if pushed else None
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                pushed.append(memo.get(int(arg)))
            elif op.stack_after and not op.stack_before:  # pushes one value and pops none
                pushed.append(arg if isinstance(arg, str) else None)
            else:
                pushed.append(None)
            del pushed[:-4]
    except Exception:  # noqa: BLE001 - any malformed stream: not a complete pickle
        return None
    return None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    line = text.splitlines()[0].strip()
    return line if len(line) <= 200 else line[:197] + "..."


_HARMLESS = ("torch.", "collections.OrderedDict", "builtins.set", "builtins.frozenset", "numpy.")


def _weights_only_failure(exc: BaseException, path: pathlib.Path) -> tuple[bool, str]:
    """(needs_unsafe, short cause) for an exception of torch.load(weights_only=True): a complete pickle
    that the weights-only unpickler refused needs full unpickling; anything else is a broken file."""
    texts = [str(exc)]
    if exc.__context__ is not None:
        texts.append(str(exc.__context__))
    joined = "\n".join(texts)
    risky = [n for n in dict.fromkeys(referenced_globals(path) or []) if not n.startswith(_HARMLESS)]
    if risky:
        return True, ", ".join(risky[:3]) + (", ..." if len(risky) > 3 else "")
    if any(m in joined for m in _UNSAFE_MARKERS):
        found = re.search(r"GLOBAL ([\w.]+)", joined) or re.search(r"Unsupported class ([\w.]+)", joined)
        return True, (found.group(1) if found else "")
    inner = exc.__context__ if exc.__context__ is not None and "Weights only load failed" in texts[0] else exc
    return False, f"{type(inner).__name__}: {first_line(inner)}"


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
    import torch

    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        needs_unsafe, cause = _weights_only_failure(exc, p)
        if not needs_unsafe:
            raise CheckpointError(f"checkpoint {p} is not a readable PyTorch file "
                                  f"(truncated or wrong format?): {cause}") from None
    if not allow_unsafe:
        what = f" (it references {cause})" if cause else ""
        raise UnsafeCheckpointError(
            f"checkpoint {p} was refused: it holds pickled Python objects{what}, so loading it needs full "
            f"unpickling, which can run arbitrary code; if the file comes from a trusted source, allow it with "
            f"--allow_unsafe_load")
    warnings.warn(f"--allow_unsafe_load: unpickling {p} with weights_only=False, which can execute "
                  f"arbitrary code; do this only for files from a trusted source", UserWarning, stacklevel=2)
    try:
        return torch.load(p, map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {p} could not be loaded: {type(exc).__name__}: "
                              f"{first_line(exc)}") from None


def sha256_file(path: PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- CSV cells

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_text_cell(text: str) -> str:
    """A text cell (a file name, a path, a theme, an error) safe to open in a spreadsheet: one starting
    with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return (a formula there, as OWASP describes
    CSV injection) gets a leading ``'``, and so does one that already starts with ``'``, so that
    ``csv_text_value`` gives the text back exactly. For text cells only: a number such as ``-0.5``
    would become text."""
    return "'" + text if text.startswith(_FORMULA_START + ("'",)) else text


def csv_text_value(cell: str) -> str:
    """The text that ``csv_text_cell`` wrote as ``cell``."""
    return cell[1:] if cell.startswith("'") else cell
