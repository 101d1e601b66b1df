"""HTTP routes the browser editor needs beyond the public run/workflow API.

- ``/api/drafts/{workspace}``: autosave of every open editor tab (restored after a reload or a
  crash). A *workspace* is one browser profile (its id lives in localStorage); each tab is one
  JSON file ``<workflows_dir>/.drafts/<workspace>/<tab>.json`` (dot folders are not listed
  as workflows).
- ``/api/inputs/{path}``: images of the input folder (LoadImage previews, the mask editor).
- ``/api/history``: finished runs with seeds and output thumbnails, filterable by workflow;
  ``DELETE /api/history/{run_id}`` forgets one (its files stay in the output folder).

``routes(state)`` is one of the server's route modules (app.fronts.http.app.build_router).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Body, Query
from fastapi.responses import FileResponse, JSONResponse, Response

from app.core import paths
from app.core.workflow import atomic_write

SAFE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
               ".gif": "image/gif", ".bmp": "image/bmp"}
MAX_DRAFTS = 64  # per workspace: an autosave loop gone wrong cannot fill the disk


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status)


def seeds_of(workflow: dict) -> list[int]:
    """The constant seed values of a workflow (inputs named ``seed`` or ``noise_seed``)."""
    found = []
    for node in (workflow or {}).get("nodes", {}).values():
        for name, value in (node.get("inputs") or {}).items():
            if "seed" in name and isinstance(value, int) and not isinstance(value, bool):
                found.append(value)
    return found


def _draft_folder(state: Any, workspace: str) -> Path | None:
    if not SAFE_ID.match(workspace):
        return None
    return Path(state.settings.workflows_dir) / ".drafts" / workspace


def _register_drafts(router: APIRouter, state: Any) -> None:
    @router.get("/drafts/{workspace}", summary="The autosaved editor tabs of one browser workspace")
    def get_drafts(workspace: str) -> JSONResponse:
        folder = _draft_folder(state, workspace)
        if folder is None:
            return _error(400, "bad workspace id")
        drafts = []
        for file in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                drafts.append(json.loads(file.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                continue  # a half-written draft of a crash: the others still come back
        drafts.sort(key=lambda d: (d.get("position", 0), d.get("updated", 0)))
        return JSONResponse({"drafts": drafts})

    @router.put("/drafts/{workspace}/{tab}", summary="Autosave one editor tab")
    def put_draft(workspace: str, tab: str, draft: Any = Body(...)) -> JSONResponse:  # noqa: B008 - FastAPI's idiom
        folder = _draft_folder(state, workspace)
        if folder is None or not SAFE_ID.match(tab):
            return _error(400, "bad workspace or tab id")
        if not isinstance(draft, dict) or not isinstance(draft.get("workflow"), dict):
            return _error(400, "a draft is an object with a 'workflow'")
        target = folder / f"{tab}.json"
        if not target.exists() and folder.is_dir() and len(list(folder.glob("*.json"))) >= MAX_DRAFTS:
            return _error(409, f"at most {MAX_DRAFTS} open tabs are autosaved")
        draft["id"] = tab
        atomic_write(target, json.dumps(draft, ensure_ascii=False).encode("utf-8"))
        return JSONResponse({"id": tab, "saved": True})

    @router.delete("/drafts/{workspace}/{tab}", summary="Forget one closed editor tab")
    def delete_draft(workspace: str, tab: str) -> JSONResponse:
        folder = _draft_folder(state, workspace)
        if folder is None or not SAFE_ID.match(tab):
            return _error(400, "bad workspace or tab id")
        (folder / f"{tab}.json").unlink(missing_ok=True)
        return JSONResponse({"id": tab, "deleted": True})


def _register_history(router: APIRouter, state: Any) -> None:
    from app.fronts.http.routes.runs import output_files  # the server's one definition of output URLs

    def store():
        if state.queue is None:
            state.start()
        return state.queue.store

    @router.get("/history", summary="Finished runs with time, duration, seeds and output thumbnails")
    def get_history(workflow: str | None = Query(None, max_length=200), limit: int = Query(60, ge=1, le=200),
                    offset: int = Query(0, ge=0)) -> JSONResponse:
        records, _total = store().history(1000, 0)
        names = sorted({r.name for r in records})
        if workflow:
            records = [r for r in records if r.name == workflow]
        items = []
        for summary in records[offset: offset + limit]:
            record = store().get(summary.id)
            if record is None:
                continue
            item = record.summary()
            item["seeds"] = seeds_of(record.workflow)
            item["outputs"] = output_files(record, state.output_root())
            items.append(item)
        return JSONResponse({"runs": items, "total": len(records), "workflows": names})

    @router.delete("/history/{run_id}", summary="Forget a finished run (its files stay in the output folder)")
    def delete_history(run_id: str) -> JSONResponse:
        record = store().get(run_id)
        if record is None:
            return _error(404, f"no run {run_id!r}")
        if record.status in ("queued", "running"):
            return _error(409, "cancel the run first")
        store().delete(run_id)
        return JSONResponse({"run_id": run_id, "deleted": True})


def register(router: APIRouter, state: Any) -> None:
    """Add the editor's routes to ``router`` (the server's ``/api`` router)."""
    _register_drafts(router, state)
    _register_history(router, state)

    @router.get("/inputs/{path:path}", summary="An image of the input folder (previews, mask editor)")
    def get_input(path: str) -> Response:
        try:
            target = paths.confine(paths.input_dir(), path)
        except paths.PathRefused as exc:
            return _error(403, str(exc))
        media_type = IMAGE_TYPES.get(target.suffix.lower())
        if media_type is None or not target.is_file():
            return _error(404, f"no image {path!r} in the input folder")
        headers = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "default-src 'none'; sandbox",
                   "Cache-Control": "no-cache"}
        return FileResponse(target, media_type=media_type, headers=headers)


__all__ = ["register", "seeds_of"]


def routes(state: Any) -> APIRouter:
    """The editor's routes on an /api router with the server's JSON body limits."""
    from app.fronts.http.bodies import api_router

    router = api_router(state)
    register(router, state)
    return router
