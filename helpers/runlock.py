"""The lock that keeps two runs out of one run folder.

A bottom-layer helper: it imports nothing of ours.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import socket
import warnings

PathLike = str | os.PathLike

__all__ = ["RunLockedError", "RunLock"]


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
