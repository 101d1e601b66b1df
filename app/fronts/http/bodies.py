"""Request bodies: every JSON body of every route goes through the one capped parser (app.core.jsonlimits)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.routing import APIRoute

from app.core.jsonlimits import JSONRefused, parse
from app.fronts.http.responses import JSONResponse
from app.fronts.http.security import BodyTooLarge
from app.fronts.http.state import AppState


class BodyRefused(HTTPException):
    """A body over the size cap (413) or JSON past the nesting cap (400); answered as {"error": ...}."""


async def body_refused(request: Request, exc: BodyRefused) -> JSONResponse:
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code)


def api_router(state: AppState) -> APIRouter:
    """An /api router whose routes parse JSON bodies with the server's limits."""
    max_bytes = state.settings.max_json_bytes

    class LimitedRequest(Request):
        async def body(self) -> bytes:
            try:
                return await super().body()
            except BodyTooLarge as exc:  # a chunked body went past the cap while being read
                raise BodyRefused(413, str(exc)) from None

        async def json(self) -> Any:
            if not hasattr(self, "_json"):
                try:
                    self._json = parse(await self.body(), max_bytes=max_bytes)
                except JSONRefused as exc:
                    if exc.decode_error is not None:  # not JSON at all: FastAPI's usual 422 "invalid request body"
                        raise exc.decode_error from None
                    raise BodyRefused(413 if exc.too_large else 400, str(exc)) from None
            return self._json

    class LimitedRoute(APIRoute):
        def get_route_handler(self):
            handler = super().get_route_handler()

            async def limited(request: Request):
                return await handler(LimitedRequest(request.scope, request.receive))

            return limited

    return APIRouter(prefix="/api", route_class=LimitedRoute)
