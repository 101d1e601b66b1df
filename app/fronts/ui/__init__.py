"""The browser editor: one NiceGUI page hosting the litegraph canvas.

The page itself is thin: a Vue component (``editor_component.js``) mounts the editor
application that lives in ``static/ditgraph/`` (our ES modules) and ``static/vendor/``
(litegraph), and the application talks to the HTTP API (``/api/...``) and the websocket
event stream directly. Python only serves the page and the static files.

``register()`` is called once by ``app.fronts.http.app.create_app``.
"""

from __future__ import annotations

import hashlib
from typing import Any

from app.core.paths import REPO_ROOT

STATIC_DIR = REPO_ROOT / "static"
STATIC_URL = "/static"
DEFAULT_WORKFLOW = "shapes-txt2img"

_registered = False


def static_version() -> str:
    """A short hash of our front-end files' names, sizes and mtimes (cache busting)."""
    digest = hashlib.sha256()
    for path in sorted((STATIC_DIR / "ditgraph").rglob("*")):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:10]


def register(state: Any = None, *, title: str = "ditgraph", default_workflow: str = DEFAULT_WORKFLOW, **_: Any) -> None:
    """Add the editor page ('/') and the front-end files ('/static/...') to NiceGUI's app.

    ``state`` is the server's AppState (unused for now: the page reaches everything through
    the HTTP API). NiceGUI has one app per process, so a second call is a no-op.
    """
    global _registered
    if _registered:
        return
    _registered = True

    from nicegui import app as nicegui_app
    from nicegui import ui

    from app.fronts.ui.page import EditorComponent

    nicegui_app.add_static_files(STATIC_URL, STATIC_DIR, max_cache_age=0)

    @ui.page("/", title=title)
    def editor_page() -> None:
        ui.query(".nicegui-content").classes("p-0 gap-0")
        ui.query("body").style("overflow: hidden; background: #1b1d21")
        EditorComponent(static_url=STATIC_URL, version=static_version(), default_workflow=default_workflow).style(
            "width: 100vw; height: 100vh"
        )


__all__ = ["register", "static_version", "STATIC_DIR"]
