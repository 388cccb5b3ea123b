"""The FastAPI application: the page, its static files and the JSON API on top of one ``Scorer``."""
from __future__ import annotations

import ipaddress
import json
import math
from collections.abc import Awaitable, Callable, Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from helpers.console import one_line, safe_text
from imagedata.images import DataError
from scoring import Scorer, output_columns, result_rows

from .slots import Busy, Slots
from .uploads import BODY_TIMEOUT_S, UploadError, body_deadline, body_limit, drain, read_body, read_uploads
from .work import AttentionUnavailable, attention_png, csv_text, has_attention, results_from_rows, score_uploads

STATIC = Path(__file__).resolve().parent / "static"
CSV_BODY_LIMIT = 16 << 20  # bytes of result rows sent back for a CSV
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")  # Host header names always answered
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
                                 b"base-uri 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
_FILES_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
    "required": ["files"]}}}}}
_FILE_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "properties": {"file": {"type": "string", "format": "binary"}}, "required": ["file"]}}}}}


@dataclass(frozen=True)
class Limits:
    """What one server accepts: bytes per file, files per request, requests computing at once and
    requests waiting (once their body has arrived), pixels decoded per request, and the seconds a body
    may take to arrive. Uploaded bytes held at once stay under (slots + queue) * max_files * max_file_bytes."""

    max_file_bytes: int = 25 << 20
    max_files: int = 8
    slots: int = 1
    queue: int = 4
    max_pixels: int = 200_000_000
    body_timeout: float = BODY_TIMEOUT_S

    def __post_init__(self) -> None:
        for name, low in (("max_file_bytes", 1), ("max_files", 1), ("slots", 1), ("queue", 0), ("max_pixels", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"--{name} must be an integer >= {low}, got {value!r}")
        value = self.body_timeout
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"--body_timeout must be a number of seconds > 0, got {value!r}")


def host_name(header: str) -> str | None:
    """The name of a Host header (``name``, ``name:port``, ``[v6]:port``), lower case; None if malformed."""
    name, sep, port = header.rpartition(":") if not header.endswith("]") else (header, "", "")
    if not sep:
        name = header
    elif not (port.isascii() and port.isdigit() and int(port) <= 65535) or (":" in name and not name.startswith("[")):
        return None
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    return name.lower() or None


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class _HostCheck:
    """Pure ASGI middleware: requests whose Host header names another server (a web page elsewhere
    reaching this one by DNS rebinding) get 400. ``any_address``: any IP address is a good name too."""

    def __init__(self, app: Any, hosts: Collection[str], any_address: bool) -> None:
        self.app, self.hosts, self.any_address = app, {h.lower().strip("[]") for h in hosts}, any_address

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            raw = next((v for k, v in scope["headers"] if k == b"host"), b"").decode("latin-1")
            name = host_name(raw)
            if name is None or not (name in self.hosts or (self.any_address and _is_address(name))):
                shown = safe_text(raw[:100]) or "(none)"
                answer = _error(400, f"the Host header {shown!r} is not a name this server answers to "
                                     f"({', '.join(sorted(self.hosts))}): open the address serve.py printed",
                                Connection="close")
                await answer(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _SecurityHeaders:
    """Pure ASGI middleware: the page may load only its own files (no request body is touched)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status, headers=headers or None)


def model_info(scorer: Scorer, limits: Limits) -> dict[str, Any]:
    """What ``/api/info`` answers: the model, its preprocessing and output, and the limits."""
    preset = scorer.pretrained_cfg
    return {
        "status": "ok",
        "model": "TANet",
        "variant": scorer.variant,
        "checkpoint": scorer.checkpoint.name if scorer.checkpoint is not None else None,
        "device": str(scorer.device),
        "theme_fusion": scorer.theme_fusion,
        "batch_size": scorer.batch_size,
        "output": preset.output_meaning,
        "score_range": [1, 10],
        "columns": output_columns(scorer.variant),
        "preprocessing": preset.preprocessing,
        "attention": has_attention(scorer),
        "limits": asdict(limits),
    }


def create_app(scorer: Scorer, limits: Limits = Limits(), *, hosts: Collection[str] = LOCAL_HOSTS,
               any_address: bool = False) -> FastAPI:
    """The web page and JSON API scoring with ``scorer`` within ``limits``, answering requests whose Host
    header names one of ``hosts`` (with any port), or with ``any_address`` any IP address."""
    slots = Slots(limits.slots, limits.queue, (limits.slots + limits.queue) * body_limit(limits.max_files,
                                                                                          limits.max_file_bytes))
    info = model_info(scorer, limits)
    app = FastAPI(title="TANet aesthetic scores", version="1", docs_url=None, redoc_url=None)
    app.add_middleware(_HostCheck, hosts=(*LOCAL_HOSTS, *hosts), any_address=any_address)
    app.add_middleware(_SecurityHeaders)  # the outermost: every answer has them
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/api/info", summary="The model, its preprocessing and the server's limits")
    @app.get("/api/health", summary="The same as /api/info")
    async def health() -> dict[str, Any]:
        return {**info, "admitted": slots.admitted, "receiving": slots.receiving}

    _add_upload_routes(app, scorer, limits, _computer(slots, limits))
    _add_csv_route(app, scorer, limits, slots)
    return app


def _computer(slots: Slots, limits: Limits) -> Callable[..., Awaitable[Any]]:
    """``computed(request, field, max_files, work)`` of the upload routes, within ``slots`` and ``limits``."""
    upload_limit = body_limit(limits.max_files, limits.max_file_bytes)

    async def computed(request: Request, field: str, max_files: int, work: Any) -> Any:
        """Read the request's uploads (holding no place while they arrive, within the body deadline),
        take a place, wait for a slot and run ``work(uploads)`` in a thread; a Response for a refused
        or failed request."""
        deadline = body_deadline(limits.body_timeout)
        async with slots.receive() as charge:
            try:
                slots.check_room()  # at once when every place is taken, before the body is read
                uploads = await read_uploads(request, field=field, max_files=max_files,
                                             max_file_bytes=limits.max_file_bytes, deadline=deadline, charge=charge)
                async with slots.admit(), slots.compute():
                    return await run_in_threadpool(work, uploads)
            except Busy as exc:
                await drain(request, upload_limit, deadline)
                return _error(503, str(exc), **{"Retry-After": "1"})
            except UploadError as exc:
                if exc.status == 408:  # no more waiting for this body: answer and close the connection
                    return _error(exc.status, exc.message, Connection="close")
                await drain(request, upload_limit, deadline)
                return _error(exc.status, exc.message)

    return computed


def _add_upload_routes(app: FastAPI, scorer: Scorer, limits: Limits,
                       computed: Callable[..., Awaitable[Any]]) -> None:
    """``POST /api/score`` (results as JSON or CSV) and ``POST /api/attention`` (a PNG), on uploads."""

    @app.post("/api/score", summary="Score images sent as multipart form fields named 'files'",
              openapi_extra=_FILES_BODY)
    async def score(request: Request, format: str = "json") -> Response:
        """One result per file, in order, with predict.py's fields (image, score, for ava std and p1..p10,
        error); ``?format=csv`` gives predict.py's CSV."""
        if format not in ("json", "csv"):
            return _error(400, f"format must be 'json' or 'csv', got {format!r}")
        try:
            results = await computed(request, "files", limits.max_files,
                                     lambda ups: score_uploads(scorer, ups, limits.max_pixels))
        except Exception as exc:  # noqa: BLE001 - the server stays up; the client learns why
            return _error(500, f"scoring failed: {one_line(exc)}")
        if isinstance(results, Response):
            return results
        if format == "csv":
            return Response(csv_text(results, scorer.variant), media_type="text/csv; charset=utf-8",
                            headers={"Content-Disposition": 'attachment; filename="tanet_scores.csv"'})
        return JSONResponse({"variant": scorer.variant, "results": result_rows(results, scorer.variant)})

    @app.post("/api/attention", summary="The RGB-attention figure (PNG) of one image sent in the field 'file'",
              openapi_extra=_FILE_BODY, response_class=Response)
    async def attention(request: Request) -> Response:
        try:
            png = await computed(request, "file", 1, lambda ups: attention_png(scorer, ups[0]))
        except AttentionUnavailable as exc:
            return _error(501, str(exc))
        except DataError as exc:
            return _error(422, str(exc))
        except Exception as exc:  # noqa: BLE001
            return _error(500, f"the attention figure failed: {one_line(exc)}")
        if isinstance(png, Response):
            return png
        return Response(png, media_type="image/png")


def _add_csv_route(app: FastAPI, scorer: Scorer, limits: Limits, slots: Slots) -> None:
    """``POST /api/csv``: result rows of ``/api/score`` sent back, as predict.py's CSV."""

    @app.post("/api/csv", summary="Result rows of /api/score (JSON) as predict.py's CSV")
    async def results_csv(request: Request) -> Response:
        try:
            async with slots.receive() as charge:
                body = await read_body(request, CSV_BODY_LIMIT, body_deadline(limits.body_timeout), charge)
                payload = json.loads(body.decode("utf-8"))
                del body
                rows = payload.get("results") if isinstance(payload, dict) else payload
                text = csv_text(results_from_rows(rows, scorer.variant), scorer.variant)
        except Busy as exc:
            return _error(503, str(exc), **{"Retry-After": "1", "Connection": "close"})
        except UploadError as exc:
            return _error(exc.status, exc.message, **({"Connection": "close"} if exc.status == 408 else {}))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return _error(400, f"the body is not UTF-8 JSON: {one_line(exc)}")
        except RecursionError:
            return _error(400, "the body is JSON nested too deeply: send {\"results\": [...]}, the rows of "
                               "/api/score")
        except ValueError as exc:
            return _error(422, one_line(exc))
        return Response(text, media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": 'attachment; filename="tanet_scores.csv"'})
