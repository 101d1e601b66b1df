"""The run queue: submit, list, inspect and cancel runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from app.core.workflow import WorkflowError
from app.fronts.http.bodies import api_router
from app.fronts.http.responses import JSONResponse, error, problems_response, targets_of
from app.fronts.http.state import AppState
from app.runs.events import make_jsonable, saved_outputs


class RunRequest(BaseModel):
    workflow: Any = Field(..., description="a ditgraph workflow document")
    client_id: str | None = Field(None, max_length=200, description="websocket client that receives this run's events")
    targets: list[str | int] | None = Field(None, max_length=10000, description="output node ids to compute (default: all output nodes)")
    front: bool = Field(False, description="queue it ahead of every queued run (it runs next)")


VIDEO_FIELDS = ("format", "frames", "fps", "width", "height")


def output_files(record, root: Path) -> list[dict]:
    """The files a run's UI data names, with their URLs (/api/outputs/... or /api/temp/...) and
    what they are (``kind``: "image", "video" or "file"); a video also gets its ``poster`` URL
    (when its still is there), format, frame count, fps and size."""
    found = []
    for node_id, ui in (record.ui or {}).items():
        for file in saved_outputs(ui, root):
            relative = file.entry["path"]
            url = f"/api/{'temp' if file.kind == 'temp' else 'outputs'}/" + quote(relative)
            item = {"node": node_id, "filename": file.entry["filename"], "type": file.kind, "path": relative,
                    "url": url, "kind": file.media}
            if file.media == "video":
                item.update({k: file.entry[k] for k in VIDEO_FIELDS if k in file.entry})
                if file.poster:
                    item["poster"] = "/api/temp/" + quote(file.poster)
            found.append(item)
    return found



def routes(state: AppState) -> APIRouter:
    router = api_router(state)

    @router.post("/runs", summary="Queue a run", status_code=200)
    def post_run(body: RunRequest) -> JSONResponse:
        try:
            record = state.run_queue().submit(body.workflow, body.client_id, targets_of(body.targets), front=body.front)
        except WorkflowError as exc:
            return problems_response(exc)
        return JSONResponse({"run_id": record.id, "position": state.run_queue().position(record.id)})

    @router.get("/runs", summary="The queue (running, then queued) and the history, newest first")
    def get_runs(limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0, le=10**9),
                 status: str | None = Query(None, pattern="^(success|failed|cancelled)$")) -> JSONResponse:
        active = state.run_queue().store.active()
        history, total = state.run_queue().store.history(limit, offset, status)
        queued_ahead = 0
        active_out = []
        for record in active:
            item = record.summary()
            if record.status == "queued":
                item["position"] = queued_ahead
                queued_ahead += 1
            active_out.append(item)
        return JSONResponse({"queue": active_out, "history": [r.summary() for r in history],
                             "history_total": total, "limit": limit, "offset": offset})

    @router.post("/runs/cancel-all", summary="Cancel every queued run and the running one")
    def post_cancel_all() -> JSONResponse:
        return JSONResponse(state.run_queue().cancel_all())

    @router.get("/runs/{run_id}", summary="One run: status, outputs, error, timings, reasons")
    def get_run(run_id: str) -> JSONResponse:
        record = state.run_queue().get(run_id)
        if record is None:
            return error(404, f"no run {run_id!r}")
        data = record.summary(with_workflow=True)
        data["position"] = state.run_queue().position(run_id)
        data["outputs"] = output_files(record, state.output_root())
        return JSONResponse(make_jsonable(data))

    @router.post("/queue/{run_id}/front", summary="Move a queued run to the front of the queue (it runs next)")
    def post_front(run_id: str) -> JSONResponse:
        position = state.run_queue().move_to_front(run_id)
        if position is None:
            record = state.run_queue().get(run_id)
            if record is None:
                return error(404, f"no run {run_id!r}")
            return error(409, f"run {run_id!r} is {record.status}, not queued")
        return JSONResponse({"run_id": run_id, "position": position})

    @router.delete("/runs/{run_id}", summary="Cancel a queued or running run")
    def delete_run(run_id: str) -> JSONResponse:
        status = state.run_queue().cancel(run_id)
        if status is None:
            return error(404, f"no run {run_id!r}")
        return JSONResponse({"run_id": run_id, "status": status})

    return router
