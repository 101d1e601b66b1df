"""The node catalogue, validation and explanation of a workflow."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel

from app.core import paths
from app.core.workflow import Workflow, WorkflowError, errors
from app.fronts.http.bodies import api_router
from app.fronts.http.responses import JSONResponse, error, problems_response, targets_of
from app.fronts.http.state import AppState


class ValidateRequest(BaseModel):
    workflow: Any
    targets: list[str | int] | None = None



def routes(state: AppState) -> APIRouter:
    router = api_router(state)

    @router.get("/nodes", summary="The node catalogue")
    def get_nodes() -> list[dict]:
        return state.registry.catalogue()

    @router.post("/validate", summary="Every problem of a workflow, at once")
    def post_validate(body: ValidateRequest) -> JSONResponse:
        try:
            workflow = Workflow.from_dict(body.workflow)
        except WorkflowError as exc:
            return JSONResponse({"valid": False, "problems": [p.to_dict() for p in exc.problems]})
        problems = state.engine.validate(workflow, targets_of(body.targets))
        return JSONResponse({"valid": not errors(problems), "problems": [p.to_dict() for p in problems]})

    @router.post("/explain", summary="Execution order, per node whether it would be a cache hit and why not, and "
                 "per loader its VRAM plan (estimates)")
    def post_explain(body: ValidateRequest) -> JSONResponse:
        try:
            workflow = Workflow.from_dict(body.workflow)
            targets = targets_of(body.targets)
            problems = errors(state.engine.validate(workflow, targets))
            if problems:
                raise WorkflowError(problems)
        except WorkflowError as exc:
            return problems_response(exc)
        try:
            targets, order = state.engine.plan(workflow, targets)
            reasons = state.engine.explain(workflow)
            estimates = state.engine.estimates(workflow, targets, _run_device(state))
        except paths.PathRefused as exc:  # a file vanished since validation
            return error(400, str(exc))
        return JSONResponse({"targets": targets, "order": order, "reasons": reasons, "estimates": estimates})

    return router


def _run_device(state: AppState) -> str | None:
    """Where runs execute, for loaders' VRAM plans: the Ray workers' device (this engine only
    validates then), else None (the engine's own)."""
    if not state.settings.ray:
        return None
    workers = state.run_queue().dispatcher.describe().get("workers") or []
    return next((w["device"] for w in workers if w.get("device")), state.settings.ray_device)
