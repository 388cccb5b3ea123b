"""Downloads that either complete and verify or leave nothing behind.

A bottom-layer helper: it imports nothing of ours.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import sys

from helpers.console import progress as progress_bar
from helpers.safe_io import atomic_write, first_line

PathLike = str | os.PathLike

__all__ = ["DownloadError", "download"]


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
    import requests  # here, not above: scoring an .onnx imports this module's error, never requests

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
            with atomic_write(target, "wb") as f, progress_bar(
                    total=total, unit="B", desc=target.name, enabled=progress, unit_scale=True,
                    unit_divisor=1024) as bar:
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
                            f"(it stays refused; fix the server or your CA certificates): {first_line(exc)}") from None
    except requests.exceptions.ChunkedEncodingError as exc:
        raise DownloadError(f"download of {url} was cut off: {first_line(exc)}") from None
    except requests.exceptions.ConnectionError as exc:
        raise DownloadError(f"download of {url} failed: could not connect or the connection broke "
                            f"(offline?): {first_line(exc)}") from None
    except requests.exceptions.RequestException as exc:
        raise DownloadError(f"download of {url} failed: {type(exc).__name__}: {first_line(exc)}") from None
    except OSError as exc:
        raise DownloadError(f"download of {url} failed writing {target}: {first_line(exc)}") from None
    print(f"sha256 {digest.hexdigest()}  {target}", file=sys.stderr)
    return target
