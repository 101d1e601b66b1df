"""Helpers for the browser tests: a real ``ditgraph serve`` subprocess and headless Chromium.

Chromium is Debian's (/usr/bin/chromium, installed by scripts/install-browser.sh), driven
by the Playwright package through ``executable_path`` (never ``playwright install``).
Every request that is not to 127.0.0.1 is aborted and recorded, so a test can assert the
page fetched nothing from the internet.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("DITGRAPH_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = REPO / "test-artifacts" / "ui"
BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-features=Translate,OptimizationHints,MediaRouter",
]
VIEWPORT = {"width": 1400, "height": 860}
ED = "window.ditgraph"


def browser_skip_reason() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not Path(CHROMIUM).is_file():
        return f"{CHROMIUM} is missing: run scripts/install-browser.sh (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing: run scripts/install-browser.sh"
    try:
        import nicegui  # noqa: F401
    except ImportError:
        return "nicegui is missing (the server needs it)"
    with contextlib.suppress(ImportError):
        import app.server  # noqa: F401

        return None
    return "app.server cannot be imported"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_command(port: int, root: Path) -> list[str]:
    args = [
        "serve", "--host", "127.0.0.1", "--port", str(port),
        "--db", str(root / "queue.sqlite3"),
        "--workflows-dir", str(root / "workflows"),
        "--output-dir", str(root / "output"),
        "--input-dir", str(root / "input"),
        "--device", "cpu",
    ]
    script = shutil.which("ditgraph", path=str(Path(sys.executable).parent))
    if script:
        return [script, *args]
    return [sys.executable, "-c", "import sys; from app.cli import main; sys.exit(main())", *args]


class Server:
    """``ditgraph serve`` on a free port with temporary workflows/output/input folders."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        for name in ("workflows", "output", "input"):
            (root / name).mkdir(parents=True, exist_ok=True)
        self.log_path = root / "server.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   DITGRAPH_DB=str(root / "queue.sqlite3"), DITGRAPH_WORKFLOWS=str(root / "workflows"),
                   DITGRAPH_OUTPUTS=str(root / "output"), DITGRAPH_INPUTS=str(root / "input"))
        env.pop("DITGRAPH_TOKEN", None)
        for key in [k for k in env if k.startswith(("PYTEST_", "NICEGUI_"))]:
            env.pop(key)  # NiceGUI switches to its own test mode when it sees pytest's variables
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(serve_command(self.port, root), cwd=REPO, env=env, stdout=self.log,
                                        stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ditgraph serve exited with {self.process.returncode}:\n{self.log_text()}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                with urllib.request.urlopen(self.url + "/api/nodes", timeout=2) as response:
                    if response.status == 200:
                        return
            time.sleep(0.3)
        raise RuntimeError(f"ditgraph serve did not answer within {timeout}s:\n{self.log_text()}")

    def get_json(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.loads(response.read())

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return response.read()

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.log.close()


class BrowserPage:
    """One tab: the Playwright page plus what it tried to fetch from outside and its errors."""

    def __init__(self, context, server: Server):
        self.server = server
        self.page = context.new_page()
        self.external: list[str] = []
        self.errors: list[str] = []
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("dialog", lambda dialog: dialog.accept())  # confirm() prompts: answer yes
        self.page.route("**/*", self._route)

    def _route(self, route) -> None:
        url = route.request.url
        if url.startswith(("http://127.0.0.1", "ws://127.0.0.1", "data:", "blob:")):
            route.continue_()
        else:
            self.external.append(url)
            route.abort()

    def open(self, path: str = "/") -> None:
        self.page.goto(self.server.url + path, wait_until="load")
        self.page.wait_for_selector('.dg-root[data-ready="1"]', timeout=30_000)

    def js(self, expression: str, arg=None):
        """Evaluate ``expression`` with ``ed`` bound to the editor (and ``arg`` as given)."""
        return self.page.evaluate(f"(arg) => {{ const ed = {ED}; return ({expression}); }}", arg)

    def wait(self, expression: str, timeout: float = 30.0, arg=None):
        self.page.wait_for_function(f"(arg) => {{ const ed = {ED}; return ({expression}); }}", arg=arg,
                                    timeout=timeout * 1000)
        return self.js(expression, arg)

    def drag(self, start, end, steps: int = 12) -> None:
        mouse = self.page.mouse
        mouse.move(*start)
        mouse.down()
        mouse.move(*end, steps=steps)
        mouse.up()

    def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path

    def palette_item(self, node_type: str):
        return self.page.locator(f'.dg-palette-item[data-type="{node_type}"]')

    def drag_from_palette(self, node_type: str, client_xy) -> str:
        """Drag a palette entry onto the canvas with the mouse; returns the new node's id."""
        self.page.fill('[data-testid="palette-search"]', node_type)  # as a user would: search, then drag
        item = self.palette_item(node_type)
        item.scroll_into_view_if_needed()
        box = item.bounding_box()
        before = set(self.js("ed.graph._nodes.map(n => String(n.id))"))
        self.drag((box["x"] + 20, box["y"] + box["height"] / 2), client_xy, steps=10)
        after = self.wait("ed.graph._nodes.length > arg", arg=len(before)) and self.js(
            "ed.graph._nodes.map(n => String(n.id))")
        (new,) = set(after) - before
        self.page.fill('[data-testid="palette-search"]', "")
        return new

    def connect(self, source: str, output: str, target: str, input_name: str) -> None:
        """Drag a wire from ``source``'s output to ``target``'s input with the mouse."""
        start = self.js("ed.slotClientPos(arg[0], false, arg[1])", [source, output])
        end = self.js("ed.slotClientPos(arg[0], true, arg[1])", [target, input_name])
        self.drag(start, end)

    def link_count(self) -> int:
        return self.js("ed.graph.links.size ?? Object.keys(ed.graph.links).length")


@contextlib.contextmanager
def chromium():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@contextlib.contextmanager
def running_server(prefix: str):
    """``ditgraph serve`` in a fresh temporary root; stopped (and the root removed) afterwards."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        server = Server(Path(tmp))
        try:
            server.wait_ready()
            yield server
        finally:
            server.stop()


@contextlib.contextmanager
def editor_tab(prefix: str):
    """A server, a browser and one open editor tab; checks that no request left 127.0.0.1."""
    with running_server(prefix) as server, chromium() as browser:
        context = browser.new_context(viewport=VIEWPORT)
        tab = BrowserPage(context, server)
        tab.open()
        yield tab
        assert tab.external == [], tab.external
        context.close()


def require_browser() -> None:
    reason = browser_skip_reason()
    if reason:
        pytest.skip(reason)
