"""Files of the output and temp folders, served so a browser never renders them as our origin."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response

from app.core import paths
from app.fronts.http.bodies import api_router
from app.fronts.http.responses import error
from app.fronts.http.state import AppState
from app.runs.events import temp_root

SAFE_MEDIA_TYPES = {
    ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp", ".gif": "image/gif",
    ".mp4": "video/mp4", ".webm": "video/webm", ".json": "application/json", ".txt": "text/plain; charset=utf-8",
}


def serve_file(root: Path, path: str) -> Response:
    """A file confined to ``root``, with headers that keep the browser from running it."""
    try:
        target = paths.confine(root, path)
    except paths.PathRefused as exc:
        return error(403, str(exc))
    if not target.is_file():
        return error(404, f"no file {path!r}")
    media_type = SAFE_MEDIA_TYPES.get(target.suffix.lower())
    headers = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "default-src 'none'; sandbox"}
    if media_type is None:  # never let the browser render an unknown file (e.g. .html) as our origin
        return FileResponse(target, media_type="application/octet-stream", filename=target.name, headers=headers)
    return FileResponse(target, media_type=media_type, headers=headers)


def routes(state: AppState) -> APIRouter:
    router = api_router(state)

    @router.get("/outputs/{path:path}", summary="A file of the output folder")
    def get_output(path: str) -> Response:
        return serve_file(state.output_root(), path)

    @router.get("/temp/{path:path}", summary="A file of the temp folder (previews)")
    def get_temp(path: str) -> Response:
        return serve_file(temp_root(), path)

    return router
