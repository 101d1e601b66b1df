"""The HTTP API and websocket events, served by NiceGUI's FastAPI app (one port for UI + API).

    ditgraph serve                      # 127.0.0.1:8188, no token needed on loopback
    ditgraph serve --host 0.0.0.0 --token s3cret

Routes (all under /api; docs/api.md has the shapes), one module per resource in app.fronts.http.routes:
  nodes       GET /nodes; POST /validate, /explain
  runs        POST|GET /runs; GET|DELETE /runs/{id}; POST /runs/cancel-all
  outputs     GET /outputs/{path}, /temp/{path}
  uploads     POST /uploads, /workflow-from-png
  workflows   GET /workflows; GET|PUT|DELETE /workflows/{name}; POST /workflows/{name}/rename
  models      GET /models, /status
  ws          WS /events?client_id=X[&mode=all]
  editor      GET|PUT|DELETE /drafts/..., GET /inputs/{path}, GET|DELETE /history (the editor's own)
The guard in front of them all (token, origin, Host, body size) is app.fronts.http.security.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse

import app as app_package
from app.core import paths
from app.fronts.http.bodies import BodyRefused, body_refused
from app.fronts.http.responses import JSONResponse, validation_error
from app.fronts.http.routes import editor, models, nodes, outputs, runs, uploads, workflows, ws
from app.fronts.http.security import Guard
from app.fronts.http.settings import Settings
from app.fronts.http.state import AppState
from app.runs.store import RunStore

log = logging.getLogger(__name__)


def build_router(state: AppState) -> APIRouter:
    """Every /api route of one server."""
    router = APIRouter()
    for module in (nodes, runs, outputs, uploads, workflows, models, ws, editor):
        router.include_router(module.routes(state))
    return router


_state: AppState | None = None


def create_app(engine: Any = None, settings: Settings | None = None) -> FastAPI:
    """Register the API (and the editor UI, if ``app.fronts.ui`` is installed) on NiceGUI's app.

    NiceGUI has one app per process, so this may be called once. The engine defaults to
    one on the configured device with the default registry.
    """
    global _state
    from nicegui import app as nicegui_app

    if _state is not None:
        raise RuntimeError("create_app() was already called in this process")
    settings = settings or Settings()
    if engine is None:
        from app.core.executor import Engine

        engine = Engine(output_dir=paths.output_dir())
    if engine.output_dir is None:
        engine.output_dir = paths.output_dir()
    state = AppState(engine, settings)
    _state = state
    nicegui_app.openapi_url = "/openapi.json"
    nicegui_app.title = "ditgraph"
    nicegui_app.version = app_package.__version__
    nicegui_app.include_router(build_router(state))
    nicegui_app.add_route("/openapi.json", lambda request: JSONResponse(nicegui_app.openapi()), include_in_schema=False)
    nicegui_app.add_middleware(Guard, settings=settings)
    nicegui_app.add_exception_handler(RequestValidationError, validation_error)
    nicegui_app.add_exception_handler(BodyRefused, body_refused)
    nicegui_app.on_startup(lambda: state.start())
    nicegui_app.on_shutdown(lambda: state.stop())
    nicegui_app.state.ditgraph = state

    ui_registered = False
    try:
        from app.fronts import ui as ui_module  # built separately; optional
    except ImportError:
        ui_module = None
    if ui_module is not None and hasattr(ui_module, "register"):
        try:
            ui_module.register(state)
            ui_registered = True
        except Exception:  # a broken editor must not take the API down with it
            log.exception("the editor UI failed to register; serving the API only")
    if not ui_registered:
        @nicegui_app.get("/", include_in_schema=False)
        def index() -> HTMLResponse:
            return HTMLResponse(
                "<!doctype html><title>ditgraph</title><h1>ditgraph</h1>"
                f"<p>Version {app_package.__version__}. The editor UI is not installed; the HTTP API is at "
                "<a href='/api/status'>/api/status</a> (schema: <a href='/openapi.json'>/openapi.json</a>).</p>"
            )
    return nicegui_app


def serve(host: str = "127.0.0.1", port: int = 8188, token: str | None = None, *, engine: Any = None,
          settings: Settings | None = None, log_level: str = "warning", announce=print) -> None:
    """Run the server in this process until interrupted (the ``ditgraph serve`` command)."""
    from nicegui import ui

    settings = settings or Settings()
    settings.host, settings.port = host, port
    if token is not None:
        settings.token = token
    settings.check()
    # take the queue lock before binding, so a second server fails fast with a clear message
    probe = RunStore(settings.db_path, exclusive=True)
    probe.close()
    create_app(engine, settings)
    shown_host = f"[{host}]" if ":" in host else host
    url = f"http://{shown_host}:{port}/"
    announce(f"ditgraph {app_package.__version__} serving on {url}"
             + (f" (token required: open {url}?token={quote(settings.token)} once in the browser)" if settings.token else ""))
    ui.run(host=host, port=port, reload=False, show=False, title="ditgraph", show_welcome_message=False,
           uvicorn_logging_level=log_level, favicon=None)
