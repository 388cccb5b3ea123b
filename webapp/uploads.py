"""Uploaded files read from a multipart/form-data body as it streams in, within limits.

At most ``max_files`` files are kept, each in memory only up to ``max_file_bytes``: a larger file's
bytes are read in chunks and dropped (it gets a per-file error), and a body longer than the limits
allow is refused before it is read further. A body must arrive whole before its deadline (408 after).
Nothing is written to disk; client file names are labels.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from helpers.console import safe_text

MAX_NAME = 200  # characters of a file name kept as its label
PART_OVERHEAD = 16 << 10  # bytes of boundary and headers allowed per part on top of its data
BODY_TIMEOUT_S = 60.0  # a body not whole this long after its request began is dropped (408)


@dataclass
class Upload:
    """One uploaded file: its label and bytes, or why it is refused."""

    name: str
    data: bytes | None = None
    error: str | None = None
    size: int = 0  # bytes received (all of them, also for a refused file)


class UploadError(Exception):
    """A request that cannot be read as uploads: the HTTP status and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def human_bytes(n: int) -> str:
    """``n`` bytes as ``12.3 MB`` (powers of 1024, as file managers mostly show them)."""
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def label(raw: bytes | None, number: int) -> str:
    """A client's file name as a display label: its last path component, printable, bounded;
    ``file N`` when there is none."""
    text = (raw or b"").decode("utf-8", "replace").replace("\\", "/").rsplit("/", 1)[-1].strip()
    text = safe_text(text)
    if len(text) > MAX_NAME:
        text = text[:MAX_NAME - 3] + "..."
    return text or f"file {number}"


def _files(n: int) -> str:
    return "1 file" if n == 1 else f"{n} files"


def body_limit(max_files: int, max_file_bytes: int) -> int:
    """The longest body read: every file at its limit, plus room for boundaries and headers."""
    return max_files * (max_file_bytes + PART_OVERHEAD) + PART_OVERHEAD


def body_deadline(timeout: float = BODY_TIMEOUT_S) -> float:
    """The event-loop time by which a body starting now must have arrived whole."""
    return asyncio.get_running_loop().time() + timeout


async def _chunks(request: Request, deadline: float | None) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    if deadline is None:
        deadline = body_deadline()
    stream = request.stream()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), max(deadline - loop.time(), 0.0))
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise UploadError(408, "the request body did not arrive in time and was dropped: the server waits "
                                   "for a whole body for a limited time (serve.py --body_timeout)") from None
        except ClientDisconnect:
            raise UploadError(400, "the client disconnected during the upload") from None
        yield chunk


class _Collector:
    """python-multipart callbacks that keep the parts of one field within the limits."""

    def __init__(self, field: str, max_files: int, max_file_bytes: int) -> None:
        self.field, self.max_files, self.max_file_bytes = field, max_files, max_file_bytes
        self.uploads: list[Upload] = []
        self.ended = False
        self._header, self._value = b"", b""
        self._disposition: bytes | None = None
        self._current: Upload | None = None
        self._buffer: bytearray | None = None

    def on_part_begin(self) -> None:
        self._disposition = None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        if self._header.lower() == b"content-disposition":
            self._disposition = self._value
        self._header, self._value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name != self.field:
            raise UploadError(400, f"unexpected form field {safe_text(name)!r}: send each image in a field "
                                   f"named {self.field!r}")
        if len(self.uploads) >= self.max_files:
            raise UploadError(413, f"too many files: at most {self.max_files} per request; send the others "
                                   f"in further requests")
        self._current = Upload(label(options.get(b"filename"), len(self.uploads) + 1))
        self._buffer = bytearray()
        self.uploads.append(self._current)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        upload = self._current
        upload.size += end - start
        if self._buffer is None:
            return  # already over the limit: the bytes are dropped
        if upload.size > self.max_file_bytes:
            self._buffer = None
            return
        self._buffer += data[start:end]

    def on_part_end(self) -> None:
        upload = self._current
        if self._buffer is None:
            upload.error = (f"image file {upload.name} is {human_bytes(upload.size)}, over the server's limit "
                            f"of {human_bytes(self.max_file_bytes)} per file (serve.py --max_file_bytes)")
        else:
            upload.data = bytes(self._buffer)
        self._current, self._buffer = None, None

    def on_end(self) -> None:
        self.ended = True

    def callbacks(self) -> dict:
        return {name: getattr(self, name) for name in (
            "on_part_begin", "on_part_data", "on_part_end", "on_header_field", "on_header_value",
            "on_header_end", "on_headers_finished", "on_end")}


async def read_uploads(request: Request, *, field: str, max_files: int, max_file_bytes: int,
                       deadline: float | None = None, charge: Callable[[int], None] | None = None) -> list[Upload]:
    """The files of the multipart field ``field``, in order; UploadError for a request that is not
    multipart, names another field, holds no file or too many, is longer than the limits allow, or
    whose body is not whole by ``deadline`` (``body_deadline``; default: ``BODY_TIMEOUT_S`` from now).
    ``charge(n)`` is told of every ``n`` bytes received (and may raise to stop)."""
    kind, options = parse_options_header(request.headers.get("content-type"))
    if kind != b"multipart/form-data":
        raise UploadError(415, f"send the images as multipart/form-data, each in a field named {field!r} "
                               f"(got Content-Type {safe_text(kind.decode('latin-1')) or 'none'})")
    boundary = options.get(b"boundary")
    if not boundary:
        raise UploadError(400, "the multipart/form-data Content-Type has no boundary")
    limit = body_limit(max_files, max_file_bytes)
    collector = _Collector(field, max_files, max_file_bytes)
    try:
        parser = MultipartParser(boundary, collector.callbacks())
        received = 0
        async for chunk in _chunks(request, deadline):
            received += len(chunk)
            if received > limit:
                raise UploadError(413, f"the request is longer than {human_bytes(limit)}, the most that "
                                       f"{_files(max_files)} of at most {human_bytes(max_file_bytes)} each can take")
            if charge is not None:
                charge(len(chunk))
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise UploadError(400, f"the multipart/form-data body is malformed: {safe_text(exc)}") from None
    if not collector.uploads:
        raise UploadError(400, f"no files in the request: send one or more images, each in a form field "
                               f"named {field!r}")
    if not collector.ended or collector._current is not None:
        raise UploadError(400, "the request body ends before its closing boundary (interrupted upload?)")
    return collector.uploads


async def drain(request: Request, limit: int, deadline: float | None = None) -> None:
    """Read and drop up to ``limit`` bytes of the body until ``deadline``, so that a refusal reaches a
    client still sending."""
    received = 0
    try:
        async for chunk in _chunks(request, deadline):
            received += len(chunk)
            if received > limit:
                return
    except (UploadError, RuntimeError):  # RuntimeError: Starlette's "Stream consumed", all of it read already
        return


async def read_body(request: Request, limit: int, deadline: float | None = None,
                    charge: Callable[[int], None] | None = None) -> bytes:
    """The whole body of a small request; UploadError 413 beyond ``limit`` bytes, 408 if not whole by
    ``deadline``; ``charge`` as for ``read_uploads``."""
    body = bytearray()
    async for chunk in _chunks(request, deadline):
        if len(body) + len(chunk) > limit:
            raise UploadError(413, f"the request is longer than {human_bytes(limit)}")
        if charge is not None:
            charge(len(chunk))
        body += chunk
    return bytes(body)
