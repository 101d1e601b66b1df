"""User workflows (saved, renamed, deleted) and the shipped examples (read-only)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Body, Query
from fastapi.responses import Response
from pydantic import BaseModel, Field

from app.core import paths
from app.core.jsonlimits import parse
from app.core.workflow import Workflow, WorkflowError, atomic_write
from app.fronts.http.bodies import api_router
from app.fronts.http.responses import JSONResponse, error, problems_response
from app.fronts.http.settings import Settings
from app.fronts.http.state import AppState


class RenameRequest(BaseModel):
    new_name: str = Field(..., max_length=300)


_NAME_PART = re.compile(r"[\w][\w .()+,'&@-]{0,127}")  # fullmatch: `$` would let a trailing newline in


def workflow_relpath(name: str) -> str | None:
    """``name`` as a safe relative path ending in .json, or None if it is not acceptable."""
    name = name.strip()
    if name.endswith(".json"):
        name = name[: -len(".json")]
    parts = name.split("/")
    if not name or len(parts) > 4 or any(not _NAME_PART.fullmatch(part) or part.endswith((" ", ".")) for part in parts):
        return None
    return name + ".json"


def locate(settings: Settings, name: str, sources=("user", "shipped")) -> tuple[Path | None, JSONResponse | None]:
    """The file of a workflow name in the first of ``sources`` that has it, or the error response."""
    relative = workflow_relpath(name)
    if relative is None:
        return None, error(400, f"bad workflow name {name!r}: letters, digits, spaces and ._-()+, only; "
                             "up to 4 folders; no leading dot")
    for source in sources:
        root = settings.workflows_dir if source == "user" else settings.shipped_workflows_dir
        try:
            path = paths.confine(root, relative)
        except paths.PathRefused as exc:
            return None, error(403, str(exc))
        if path.is_file():
            return path, None
    return None, error(404, f"no workflow {name!r}")


def routes(state: AppState) -> APIRouter:
    router = api_router(state)
    settings = state.settings

    @router.get("/workflows", summary="Saved workflows (user folder) and the shipped examples (graphs/)")
    def get_workflows() -> JSONResponse:
        items = []
        for source, root in (("user", settings.workflows_dir), ("shipped", settings.shipped_workflows_dir)):
            if not root.is_dir():
                continue
            for file in sorted(root.rglob("*.json")):
                relative = file.relative_to(root).as_posix()
                if any(part.startswith(".") for part in file.relative_to(root).parts) or file.is_symlink():
                    continue
                stat = file.stat()
                items.append({"name": relative[: -len(".json")], "source": source, "modified": stat.st_mtime,
                              "size": stat.st_size})
        return JSONResponse({"workflows": items})

    @router.get("/workflows/{name:path}", summary="One workflow document (user folder first, then shipped)")
    def get_workflow(name: str, source: str | None = Query(None, pattern="^(user|shipped)$")) -> Response:
        path, problem = locate(settings, name, (source,) if source else ("user", "shipped"))
        if problem:
            return problem
        try:
            return JSONResponse(parse(path.read_bytes()))
        except (OSError, ValueError) as exc:
            return error(422, f"cannot read {name!r}: {exc}")

    @router.put("/workflows/{name:path}", summary="Save a workflow into the user folder (replaces it)")
    def put_workflow(name: str, document: Any = Body(...)) -> JSONResponse:  # noqa: B008 - FastAPI's idiom
        relative = workflow_relpath(name)
        if relative is None:
            return error(400, f"bad workflow name {name!r}")
        try:
            workflow = Workflow.from_dict(document)
            target = paths.confine(settings.workflows_dir, relative)
        except WorkflowError as exc:
            return problems_response(exc)
        except paths.PathRefused as exc:
            return error(403, str(exc))
        atomic_write(target, (workflow.to_json() + "\n").encode("utf-8"))
        return JSONResponse({"name": relative[: -len(".json")], "source": "user", "saved": True})

    @router.delete("/workflows/{name:path}", summary="Delete a user workflow")
    def delete_workflow(name: str) -> JSONResponse:
        path, problem = locate(settings, name, ("user",))
        if problem:
            if problem.status_code == 404 and locate(settings, name, ("shipped",))[0] is not None:
                return error(403, f"{name!r} is a shipped example and read-only")
            return problem
        path.unlink()
        return JSONResponse({"name": name, "deleted": True})

    @router.post("/workflows/{name:path}/rename", summary="Rename (move) a user workflow")
    def rename_workflow(name: str, body: RenameRequest) -> JSONResponse:
        path, problem = locate(settings, name, ("user",))
        if problem:
            return problem
        relative = workflow_relpath(body.new_name)
        if relative is None:
            return error(400, f"bad workflow name {body.new_name!r}")
        try:
            target = paths.confine(settings.workflows_dir, relative)
        except paths.PathRefused as exc:
            return error(403, str(exc))
        if target.exists():
            return error(409, f"a workflow named {body.new_name!r} already exists")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        return JSONResponse({"name": relative[: -len(".json")], "renamed_from": name})

    return router
