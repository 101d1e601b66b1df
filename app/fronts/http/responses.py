"""JSON responses and error shapes shared by every route."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse as _JSONResponse

from app.core.workflow import WorkflowError
from app.runs.events import make_jsonable


class JSONResponse(_JSONResponse):
    """JSON that never fails to render: NaN/Infinity (which clients may send) become null."""

    def render(self, content: Any) -> bytes:
        return json.dumps(make_jsonable(content), ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"error": "invalid request body", "detail": exc.errors()}, status_code=422)


def problems_response(exc: WorkflowError, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": "invalid workflow", "problems": [p.to_dict() for p in exc.problems]}, status_code=status)


def error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def targets_of(raw: list | None) -> list[str] | None:
    return None if raw is None else [str(t) for t in raw]
