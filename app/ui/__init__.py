"""The browser editor: one NiceGUI page hosting the litegraph canvas.

The page itself is thin: a Vue component (``editor_component.js``) mounts the editor
application that lives in ``static/ditgraph/`` and talks to the HTTP API (``/api/...``)
and the websocket event stream directly. Python only serves the page, the static files
and the shipped example workflows (read-only, from ``graphs/``).

``register()`` is called once by ``app.server.create_app``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from app.paths import REPO_ROOT

STATIC_DIR = REPO_ROOT / "static"
GRAPHS_DIR = REPO_ROOT / "graphs"
DEFAULT_WORKFLOW = "shapes-txt2img.json"
STATIC_URL = "/static"
EXAMPLES_URL = "/ui/examples"

_registered: set[int] = set()


def static_version() -> str:
    """A short hash of our front-end files' names, sizes and mtimes (cache busting)."""
    digest = hashlib.sha256()
    for path in sorted((STATIC_DIR / "ditgraph").rglob("*")):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:10]


def list_examples(folder: Path = GRAPHS_DIR) -> list[dict]:
    """The shipped example workflows: file name and the name from their meta."""
    examples = []
    for path in sorted(folder.glob("*.json")):
        name = path.stem
        try:
            meta = json.loads(path.read_text(encoding="utf-8")).get("meta") or {}
            title = str(meta.get("name") or meta.get("title") or name)
            description = str(meta.get("description") or "")
        except (OSError, ValueError, AttributeError):
            continue  # not a workflow file: leave it out of the list
        examples.append({"name": name, "file": path.name, "title": title, "description": description})
    return examples


def register(fastapi_app: Any = None, *, graphs_dir: str | Path | None = None, title: str = "ditgraph", **_: Any) -> None:
    """Add the editor page ('/'), the static front-end files and the example routes.

    ``fastapi_app`` defaults to NiceGUI's ``app``; calling it twice for the same app is a no-op.
    """
    from fastapi import HTTPException
    from fastapi.responses import JSONResponse
    from nicegui import app as nicegui_app
    from nicegui import ui

    from app.ui.page import EditorComponent

    target = fastapi_app if fastapi_app is not None else nicegui_app
    if id(target) in _registered:
        return
    _registered.add(id(target))
    examples_dir = Path(graphs_dir) if graphs_dir else GRAPHS_DIR
    nicegui_app.add_static_files(STATIC_URL, STATIC_DIR, max_cache_age=0)

    @target.get(EXAMPLES_URL)
    def examples() -> JSONResponse:
        return JSONResponse(list_examples(examples_dir))

    @target.get(EXAMPLES_URL + "/{name}")
    def example(name: str) -> JSONResponse:
        candidates = {p.stem: p for p in examples_dir.glob("*.json")}
        path = candidates.get(name.removesuffix(".json"))
        if path is None:
            raise HTTPException(404, f"no shipped workflow named {name!r}")
        return JSONResponse(json.loads(path.read_text(encoding="utf-8")))

    @ui.page("/", title=title)
    def editor_page() -> None:
        ui.query(".nicegui-content").classes("p-0 gap-0")
        ui.query("body").style("overflow: hidden; background: #1b1d21")
        EditorComponent(
            static_url=STATIC_URL,
            version=static_version(),
            examples_url=EXAMPLES_URL,
            default_workflow=Path(DEFAULT_WORKFLOW).stem,
        ).classes("dg-host").style("width: 100vw; height: 100vh")
