"""The FastAPI application: the page, its static files and the JSON API on top of one ``Scorer``."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from console import one_line
from images import DataError
from presets import VARIANT_PRESETS
from scoring import Scorer, output_columns, result_rows

from .slots import Busy, Slots
from .uploads import UploadError, body_limit, drain, read_body, read_uploads
from .work import attention_png, csv_text, results_from_rows, score_uploads

STATIC = Path(__file__).resolve().parent / "static"
CSV_BODY_LIMIT = 16 << 20  # bytes of result rows sent back for a CSV
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
    requests waiting. Uploaded bytes held at once stay under (slots + queue) * max_files * max_file_bytes."""

    max_file_bytes: int = 25 << 20
    max_files: int = 8
    slots: int = 1
    queue: int = 4

    def __post_init__(self) -> None:
        for name, low in (("max_file_bytes", 1), ("max_files", 1), ("slots", 1), ("queue", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"--{name} must be an integer >= {low}, got {value!r}")


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
    preset = VARIANT_PRESETS[scorer.variant]
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
        "limits": asdict(limits),
    }


def create_app(scorer: Scorer, limits: Limits = Limits()) -> FastAPI:
    """The web page and JSON API scoring with ``scorer`` within ``limits``."""
    # Requests share the model from several threads: fix its mode now, so that Scorer's save-and-restore
    # of eval mode and theme fusion around each forward pass restores the same values in every thread.
    scorer.model.eval()
    scorer.model.theme_fusion = scorer.theme_fusion
    slots = Slots(limits.slots, limits.queue)
    info = model_info(scorer, limits)
    upload_limit = body_limit(limits.max_files, limits.max_file_bytes)
    app = FastAPI(title="TANet aesthetic scores", version="1", docs_url=None, redoc_url=None)
    app.add_middleware(_SecurityHeaders)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    async def computed(request: Request, field: str, max_files: int, work: Any) -> Any:
        """Admit the request, read its uploads, wait for a slot and run ``work(uploads)`` in a thread;
        a Response for a refused or failed request."""
        try:
            async with slots.admit():
                uploads = await read_uploads(request, field=field, max_files=max_files,
                                             max_file_bytes=limits.max_file_bytes)
                async with slots.compute():
                    return await run_in_threadpool(work, uploads)
        except Busy as exc:
            await drain(request, upload_limit)
            return _error(503, str(exc), **{"Retry-After": "1"})
        except UploadError as exc:
            await drain(request, upload_limit)
            return _error(exc.status, exc.message)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/api/info", summary="The model, its preprocessing and the server's limits")
    @app.get("/api/health", summary="The same as /api/info")
    async def health() -> dict[str, Any]:
        return {**info, "admitted": slots.admitted}

    @app.post("/api/score", summary="Score images sent as multipart form fields named 'files'",
              openapi_extra=_FILES_BODY)
    async def score(request: Request, format: str = "json") -> Response:
        """One result per file, in order, with predict.py's fields (image, score, for ava std and p1..p10,
        error); ``?format=csv`` gives predict.py's CSV."""
        if format not in ("json", "csv"):
            return _error(400, f"format must be 'json' or 'csv', got {format!r}")
        try:
            results = await computed(request, "files", limits.max_files, lambda ups: score_uploads(scorer, ups))
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
        except DataError as exc:
            return _error(422, str(exc))
        except Exception as exc:  # noqa: BLE001
            return _error(500, f"the attention figure failed: {one_line(exc)}")
        if isinstance(png, Response):
            return png
        return Response(png, media_type="image/png")

    @app.post("/api/csv", summary="Result rows of /api/score (JSON) as predict.py's CSV")
    async def results_csv(request: Request) -> Response:
        try:
            body = await read_body(request, CSV_BODY_LIMIT)
            payload = json.loads(body.decode("utf-8"))
            rows = payload.get("results") if isinstance(payload, dict) else payload
            text = csv_text(results_from_rows(rows, scorer.variant), scorer.variant)
        except UploadError as exc:
            return _error(exc.status, exc.message)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return _error(400, f"the body is not UTF-8 JSON: {one_line(exc)}")
        except ValueError as exc:
            return _error(422, one_line(exc))
        return Response(text, media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": 'attachment; filename="tanet_scores.csv"'})

    return app
