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


SPLASH = ('<div id="dg-splash" style="position:fixed;inset:0;display:flex;align-items:center;justify-content:center;'
          'background:#1b1d21;color:#9ecbff;font:600 18px system-ui,sans-serif;z-index:1">ditgraph · loading the editor…</div>')


def module_urls(version: str) -> list[str]:
    """Our ES modules as the browser imports them (editor.js carries the cache-busting version)."""
    names = sorted(p.name for p in (STATIC_DIR / "ditgraph").glob("*.js"))
    return [f"{name}?v={version}" if name == "editor.js" else name for name in names]


def register(state: Any = None, *, title: str = "ditgraph", default_workflow: str = DEFAULT_WORKFLOW, **_: Any) -> None:
    """Add the editor page ('/') and the front-end files ('/static/...') to NiceGUI's app.

    ``state`` is the server's AppState (the editor routes use its settings, queue and
    output folder). NiceGUI has one app per process, so a second call is a no-op.
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
        version = static_version()
        # fetch our modules in parallel with NiceGUI's scripts, and paint at once (the editor
        # replaces the splash when it mounts): first contentful paint does not wait for Vue
        ui.add_head_html("".join(f'<link rel="modulepreload" href="{STATIC_URL}/ditgraph/{url}">' for url in module_urls(version)))
        ui.add_body_html(SPLASH)
        ui.query(".nicegui-content").classes("p-0 gap-0")
        ui.query("body").style("overflow: hidden; background: #1b1d21")
        EditorComponent(static_url=STATIC_URL, version=version, default_workflow=default_workflow).style(
            "width: 100vw; height: 100vh"
        )


__all__ = ["register", "static_version", "STATIC_DIR"]
