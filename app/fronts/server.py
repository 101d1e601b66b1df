"""The HTTP API and websocket events, served by NiceGUI's FastAPI app (one port for UI + API).

    ditgraph serve                      # 127.0.0.1:8188, no token needed on loopback
    ditgraph serve --host 0.0.0.0 --token s3cret

Routes (all under /api; docs/api.md has the shapes):
  GET  /api/nodes                       the node catalogue
  POST /api/validate                    {workflow, targets?} -> {problems}
  POST /api/explain                     {workflow, targets?} -> {order, targets, reasons}
  POST /api/runs                        {workflow, client_id?, targets?} -> {run_id, position}
  GET  /api/runs                        queue + history (paged)
  GET  /api/runs/{id}                   status, outputs/ui, error, timings, reasons
  DELETE /api/runs/{id}                 cancel a queued or running run
  POST /api/runs/cancel-all
  GET  /api/outputs/{path}              a file of the output folder
  POST /api/uploads                     an image into the input folder
  GET  /api/workflows                   user workflows + shipped graphs/
  GET|PUT|DELETE /api/workflows/{name}; POST /api/workflows/{name}/rename
  POST /api/workflow-from-png           the workflow embedded in a ditgraph PNG
  GET  /api/models                      the models folder by kind
  GET  /api/status                      device, memo cache, queue, version
  WS   /api/events?client_id=X[&mode=all]

Safe by default: loopback only unless a token is set; with a token every request needs it
(Authorization: Bearer, ?token= or the cookie set by visiting /?token=...); browser requests
from another origin are refused unless they carry the token explicitly; the Host header must
name this machine when no token is set (DNS rebinding); files are confined to their folders.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import io
import ipaddress
import json
import logging
import os
import re
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from fastapi import APIRouter, Body, FastAPI, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.responses import JSONResponse as _JSONResponse
from pydantic import BaseModel, Field

import app as app_package
from app.core import paths
from app.core.workflow import FORMAT, Workflow, WorkflowError, atomic_write, errors
from app.runs.queue import (
    LocalDispatcher,
    QueueLocked,
    RunQueue,
    RunStore,
    file_locations,
    jsonable_event,
    make_jsonable,
    temp_root,
)

log = logging.getLogger(__name__)

MB = 1 << 20
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]", "ip6-localhost"}
TOKEN_COOKIE = "ditgraph_token"
IMAGE_MAGIC = {"png": (b"\x89PNG\r\n\x1a\n",), "jpeg": (b"\xff\xd8\xff",)}
SAFE_MEDIA_TYPES = {
    ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp", ".gif": "image/gif",
    ".mp4": "video/mp4", ".webm": "video/webm", ".json": "application/json", ".txt": "text/plain; charset=utf-8",
}


class JSONResponse(_JSONResponse):
    """JSON that never fails to render: NaN/Infinity (which clients may send) become null."""

    def render(self, content: Any) -> bytes:
        return json.dumps(make_jsonable(content), ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"error": "invalid request body", "detail": exc.errors()}, status_code=422)


class ConfigError(ValueError):
    """A server setting that cannot work (e.g. a public bind address without a token)."""


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8188
    token: str | None = None
    db_path: Path | None = None  # default: $DITGRAPH_DB or ~/ditgraph/queue.sqlite3
    workflows_dir: Path | None = None  # default: $DITGRAPH_WORKFLOWS or ~/ditgraph/workflows
    shipped_workflows_dir: Path = paths.REPO_ROOT / "graphs"
    max_upload_bytes: int = 32 * MB
    max_json_bytes: int = 16 * MB
    allowed_origins: list[str] = field(default_factory=list)  # extra origins trusted without a token
    allowed_hosts: list[str] = field(default_factory=list)  # extra Host names accepted without a token
    max_retries: int = 2
    keep_history: int = 10000
    ray: str | None = None  # dispatch to Ray workers at this address ("auto", HOST:PORT); None: in this process
    ray_device: str | None = None  # the Ray workers' device (default: one GPU each when the cluster has GPUs)

    def __post_init__(self) -> None:
        if self.token is None:
            self.token = os.environ.get("DITGRAPH_TOKEN") or None
        if self.db_path is None:
            self.db_path = Path(os.environ.get("DITGRAPH_DB") or Path.home() / "ditgraph" / "queue.sqlite3")
        if self.workflows_dir is None:
            self.workflows_dir = Path(os.environ.get("DITGRAPH_WORKFLOWS") or Path.home() / "ditgraph" / "workflows")
        self.db_path = Path(self.db_path).expanduser()
        self.workflows_dir = Path(self.workflows_dir).expanduser()

    def check(self) -> None:
        if not is_loopback(self.host) and not self.token:
            raise ConfigError(f"refusing to listen on {self.host} without a token: anyone on the network could run code "
                              "on this machine. Pass --token T (or set DITGRAPH_TOKEN), or bind 127.0.0.1")
        if self.token is not None and len(self.token) < 8:
            raise ConfigError("the token must be at least 8 characters")


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- the state one server process holds ------------------------------------------------------------


@dataclass(eq=False)
class _Connection:
    client_id: str
    all_runs: bool
    loop: asyncio.AbstractEventLoop
    outbox: asyncio.Queue

    def offer(self, text: str, droppable: bool) -> None:
        if self.outbox.full():
            if droppable:
                return  # a slow client loses progress ticks, never lifecycle events
            with contextlib.suppress(asyncio.QueueEmpty):
                self.outbox.get_nowait()
        self.outbox.put_nowait(text)


class AppState:
    """The engine, the run queue and the websocket clients of one server."""

    def __init__(self, engine: Any, settings: Settings):
        self.engine = engine
        self.settings = settings
        self.store: RunStore | None = None
        self.queue: RunQueue | None = None
        self.connections: set[_Connection] = set()
        self._connections_lock = threading.Lock()
        self.started_at = time.time()

    @property
    def registry(self):
        return self.engine.registry

    def output_root(self) -> Path:
        return Path(self.engine.output_dir or paths.output_dir())

    def start(self) -> None:
        if self.queue is not None:
            return
        self.store = RunStore(self.settings.db_path, exclusive=True)
        if self.settings.ray:
            from app.runs.ray_pool import RayDispatcher  # Ray is imported only in this mode

            dispatcher = RayDispatcher.from_engine(self.engine, self.settings.ray, self.output_root(),
                                                   device=self.settings.ray_device)
        else:
            dispatcher = LocalDispatcher(self.engine, self.output_root())
        self.queue = RunQueue(self.store, dispatcher, self.engine.validate,
                              max_retries=self.settings.max_retries, keep_history=self.settings.keep_history)
        self.queue.subscribe(self._on_event)
        self.queue.start()

    def stop(self) -> None:
        if self.queue is not None:
            self.queue.stop(timeout=10)
        if self.store is not None:
            self.store.close()
        self.queue = self.store = None

    def add_connection(self, connection: _Connection) -> None:
        with self._connections_lock:
            self.connections.add(connection)

    def remove_connection(self, connection: _Connection) -> None:
        with self._connections_lock:
            self.connections.discard(connection)

    def _on_event(self, client_id: str | None, event: dict) -> None:
        """Called from the worker thread: fan the event out to the clients that may see it."""
        with self._connections_lock:
            connections = list(self.connections)
        if not connections:
            return
        broadcast = event.get("type") == "queue"
        targets = [c for c in connections if broadcast or c.all_runs or (client_id is not None and c.client_id == client_id)]
        if not targets:
            return
        data = jsonable_event(event)
        if isinstance(data.get("error"), dict):
            data["error"] = {k: v for k, v in data["error"].items() if k != "detail"}  # tracebacks stay in the record
        text = json.dumps(data, ensure_ascii=False)
        droppable = event.get("type") == "progress"
        for connection in targets:
            with contextlib.suppress(RuntimeError):  # loop closed while shutting down
                connection.loop.call_soon_threadsafe(connection.offer, text, droppable)


# -- the guard: token, origin and host checks for every request ----------------------------------------


class Guard:
    """ASGI middleware enforcing the token, same-origin and Host rules, and a body size cap."""

    def __init__(self, app, settings: Settings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        token = self.settings.token
        explicit = _bearer(headers.get("authorization", "")) or (query.get("token") or [None])[0]
        cookie_token = _cookie(headers.get("cookie", ""), TOKEN_COOKIE)
        explicit_ok = bool(token and explicit and hmac.compare_digest(explicit.encode(), token.encode()))
        cookie_ok = bool(token and cookie_token and hmac.compare_digest(cookie_token.encode(), token.encode()))

        if token and not (explicit_ok or cookie_ok):
            return await self._refuse(scope, receive, send, 401, "a valid token is required (Authorization: Bearer T, ?token=T)")
        host = headers.get("host", "")
        if not token and not self._host_allowed(host):
            return await self._refuse(scope, receive, send, 403, f"Host {host!r} is not this machine; refused (DNS rebinding guard)")
        origin = headers.get("origin")
        if origin is not None and not explicit_ok and not self._same_origin(origin, host):
            return await self._refuse(scope, receive, send, 403, f"cross-origin request from {origin!r} refused")

        if scope["type"] == "http":
            length = headers.get("content-length")
            limit = self.settings.max_upload_bytes + MB
            if length is not None:
                if not length.isdigit():
                    return await self._refuse(scope, receive, send, 400, "bad Content-Length")
                if int(length) > limit:
                    return await self._refuse(scope, receive, send, 413, f"request body over {limit // MB} MB")
            # a page visited as /?token=T remembers the token in a same-site cookie
            if explicit_ok and not cookie_ok and not scope["path"].startswith("/api") and scope.get("method") == "GET":
                send = _with_cookie(send, token)
            receive = _capped(receive, limit)  # bodies without a Content-Length (chunked) too
        return await self.app(scope, receive, send)

    def _host_allowed(self, host: str) -> bool:
        name = _host_name(host)
        allowed = LOOPBACK_NAMES | {self.settings.host.lower()} | {h.lower() for h in self.settings.allowed_hosts}
        return name in allowed or is_loopback(name)

    def _same_origin(self, origin: str, host: str) -> bool:
        if origin in self.settings.allowed_origins:
            return True
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and bool(parts.netloc) and parts.netloc.lower() == host.lower()

    async def _refuse(self, scope, receive, send, status: int, message: str) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
            return
        body = json.dumps({"error": message}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class BodyTooLarge(Exception):
    """A request body went past the cap while it was being read."""


def _capped(receive, limit: int):
    seen = 0

    async def wrapped():
        nonlocal seen
        message = await receive()
        if message.get("type") == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(f"request body over {limit // MB} MB")
        return message

    return wrapped


def _bearer(value: str) -> str | None:
    scheme, _, credential = value.partition(" ")
    return credential.strip() or None if scheme.lower() == "bearer" else None


def _cookie(header: str, name: str) -> str | None:
    if not header:
        return None
    jar = SimpleCookie()
    with contextlib.suppress(Exception):
        jar.load(header)
    morsel = jar.get(name)
    return morsel.value if morsel else None


def _host_name(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _with_cookie(send, token: str):
    async def wrapped(message):
        if message["type"] == "http.response.start":
            cookie = f"{TOKEN_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict"
            message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie.encode("latin-1"))]}
        await send(message)

    return wrapped


# -- request bodies --------------------------------------------------------------------------------------


class RunRequest(BaseModel):
    workflow: Any = Field(..., description="a ditgraph workflow document")
    client_id: str | None = Field(None, max_length=200, description="websocket client that receives this run's events")
    targets: list[str | int] | None = Field(None, max_length=10000, description="output node ids to compute (default: all output nodes)")


class ValidateRequest(BaseModel):
    workflow: Any
    targets: list[str | int] | None = None


class RenameRequest(BaseModel):
    new_name: str = Field(..., max_length=300)


def _problems_response(exc: WorkflowError, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": "invalid workflow", "problems": [p.to_dict() for p in exc.problems]}, status_code=status)


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def _targets(raw: list | None) -> list[str] | None:
    return None if raw is None else [str(t) for t in raw]


# -- files -----------------------------------------------------------------------------------------------

_NAME_PART = re.compile(r"^[\w][\w .()+,'&@-]{0,127}$")


def _workflow_relpath(name: str) -> str | None:
    """``name`` as a safe relative path ending in .json, or None if it is not acceptable."""
    name = name.strip()
    if name.endswith(".json"):
        name = name[: -len(".json")]
    parts = name.split("/")
    if not name or len(parts) > 4 or any(not _NAME_PART.match(part) or part.endswith((" ", ".")) for part in parts):
        return None
    return name + ".json"


def output_files(record, root: Path) -> list[dict]:
    """The files a run's UI data names, with their URLs (/api/outputs/... or /api/temp/...)."""
    found = []
    for node_id, ui in (record.ui or {}).items():
        for entry, kind, _target in file_locations(ui, root):
            relative = entry["path"]
            url = f"/api/{'temp' if kind == 'temp' else 'outputs'}/" + quote(relative)
            found.append({"node": node_id, "filename": entry["filename"], "type": kind, "path": relative, "url": url})
    return found


def sniff_image(data: bytes) -> str | None:
    """'png', 'jpeg' or 'webp' by magic bytes; None otherwise."""
    for kind, magics in IMAGE_MAGIC.items():
        if any(data.startswith(m) for m in magics):
            return kind
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def png_text_chunks(data: bytes, max_text: int = 16 * MB) -> dict[str, str]:
    """The tEXt / zTXt / iTXt entries of a PNG, without decoding its pixels."""
    if not data.startswith(IMAGE_MAGIC["png"][0]):
        raise ValueError("not a PNG file")
    texts: dict[str, str] = {}
    offset = 8
    while offset + 8 <= len(data):
        length = int.from_bytes(data[offset:offset + 4], "big")
        kind = data[offset + 4:offset + 8]
        body = data[offset + 8:offset + 8 + length]
        if len(body) < length:
            break
        offset += 12 + length
        try:
            if kind == b"tEXt":
                key, _, value = body.partition(b"\0")
                texts[key.decode("latin-1")] = value.decode("latin-1")
            elif kind == b"zTXt":
                key, _, rest = body.partition(b"\0")
                texts[key.decode("latin-1")] = _inflate(rest[1:], max_text).decode("latin-1")
            elif kind == b"iTXt":
                key, _, rest = body.partition(b"\0")
                compressed, rest = rest[0], rest[2:]
                _language, _, rest = rest.partition(b"\0")
                _translated, _, value = rest.partition(b"\0")
                texts[key.decode("latin-1")] = (_inflate(value, max_text) if compressed else value).decode("utf-8")
            elif kind == b"IEND":
                break
        except (ValueError, IndexError, zlib.error, UnicodeDecodeError):
            continue
    return texts


def _inflate(data: bytes, limit: int) -> bytes:
    decompressor = zlib.decompressobj()
    out = decompressor.decompress(data, limit)
    if decompressor.unconsumed_tail:
        raise ValueError("compressed text too large")
    return out


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The whole request body, or None once it exceeds ``limit`` bytes."""
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
    except BodyTooLarge:
        return None
    return b"".join(chunks)


async def _uploaded_bytes(request: Request, limit: int) -> tuple[bytes, str] | JSONResponse:
    """(file bytes, original file name) from a multipart form (field ``image`` or ``file``) or a raw body."""
    body = await _read_body(request, limit + 64 * 1024)
    if body is None:
        return _error(413, f"upload over the {limit // MB} MB limit")
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=4, max_fields=16)
        except Exception as exc:
            return _error(400, f"unreadable multipart form: {exc}")
        upload = form.get("image") or form.get("file")
        if upload is None or isinstance(upload, str):
            return _error(400, "send the file in a form field named 'image' (or 'file')")
        data = await upload.read()
        name = upload.filename or "upload"
        await form.close()
    else:
        data, name = body, request.headers.get("x-filename", "upload")
    if len(data) > limit:
        return _error(413, f"upload over the {limit // MB} MB limit")
    if not data:
        return _error(400, "the upload is empty")
    return data, name


def _safe_stem(name: str) -> str:
    stem = Path(name.replace("\\", "/")).name
    stem = stem.rsplit(".", 1)[0] if "." in stem else stem
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")[:64]
    return stem or "upload"


# -- the routes --------------------------------------------------------------------------------------------


def build_router(state: AppState) -> APIRouter:
    router = APIRouter(prefix="/api")
    settings = state.settings

    def queue() -> RunQueue:
        if state.queue is None:  # started lazily when the app runs without the startup hook (tests)
            state.start()
        return state.queue

    @router.get("/nodes", summary="The node catalogue")
    def get_nodes() -> list[dict]:
        return state.registry.catalogue()

    @router.post("/validate", summary="Every problem of a workflow, at once")
    def post_validate(body: ValidateRequest) -> JSONResponse:
        try:
            workflow = Workflow.from_dict(body.workflow)
        except WorkflowError as exc:
            return JSONResponse({"valid": False, "problems": [p.to_dict() for p in exc.problems]})
        problems = state.engine.validate(workflow, _targets(body.targets))
        return JSONResponse({"valid": not errors(problems), "problems": [p.to_dict() for p in problems]})

    @router.post("/explain", summary="Execution order and, per node, whether it would be a cache hit and why not")
    def post_explain(body: ValidateRequest) -> JSONResponse:
        try:
            workflow = Workflow.from_dict(body.workflow)
            targets = _targets(body.targets)
            problems = errors(state.engine.validate(workflow, targets))
            if problems:
                raise WorkflowError(problems)
        except WorkflowError as exc:
            return _problems_response(exc)
        try:
            targets, order = state.engine.plan(workflow, targets)
            reasons = state.engine.explain(workflow)
        except paths.PathRefused as exc:  # a file vanished since validation
            return _error(400, str(exc))
        return JSONResponse({"targets": targets, "order": order, "reasons": reasons})

    @router.post("/runs", summary="Queue a run", status_code=200)
    def post_run(body: RunRequest) -> JSONResponse:
        try:
            record = queue().submit(body.workflow, body.client_id, _targets(body.targets))
        except WorkflowError as exc:
            return _problems_response(exc)
        return JSONResponse({"run_id": record.id, "position": queue().position(record.id)})

    @router.get("/runs", summary="The queue (running, then queued) and the history, newest first")
    def get_runs(limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0, le=10**9),
                 status: str | None = Query(None, pattern="^(success|failed|cancelled)$")) -> JSONResponse:
        active = queue().store.active()
        history, total = queue().store.history(limit, offset, status)
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
        return JSONResponse(queue().cancel_all())

    @router.get("/runs/{run_id}", summary="One run: status, outputs, error, timings, reasons")
    def get_run(run_id: str) -> JSONResponse:
        record = queue().get(run_id)
        if record is None:
            return _error(404, f"no run {run_id!r}")
        data = record.summary(with_workflow=True)
        data["position"] = queue().position(run_id)
        data["outputs"] = output_files(record, state.output_root())
        return JSONResponse(make_jsonable(data))

    @router.delete("/runs/{run_id}", summary="Cancel a queued or running run")
    def delete_run(run_id: str) -> JSONResponse:
        status = queue().cancel(run_id)
        if status is None:
            return _error(404, f"no run {run_id!r}")
        return JSONResponse({"run_id": run_id, "status": status})

    @router.get("/outputs/{path:path}", summary="A file of the output folder")
    def get_output(path: str) -> Response:
        return _serve_file(state.output_root(), path)

    @router.get("/temp/{path:path}", summary="A file of the temp folder (previews)")
    def get_temp(path: str) -> Response:
        return _serve_file(temp_root(), path)

    def _serve_file(root: Path, path: str) -> Response:
        try:
            target = paths.confine(root, path)
        except paths.PathRefused as exc:
            return _error(403, str(exc))
        if not target.is_file():
            return _error(404, f"no file {path!r}")
        media_type = SAFE_MEDIA_TYPES.get(target.suffix.lower())
        headers = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "default-src 'none'; sandbox"}
        if media_type is None:  # never let the browser render an unknown file (e.g. .html) as our origin
            return FileResponse(target, media_type="application/octet-stream", filename=target.name, headers=headers)
        return FileResponse(target, media_type=media_type, headers=headers)

    upload_doc = {"requestBody": {"content": {"multipart/form-data": {"schema": {
        "type": "object", "properties": {"image": {"type": "string", "format": "binary"}}, "required": ["image"]}}}}}

    @router.post("/uploads", summary="Upload a PNG, JPEG or WebP image into the input folder", openapi_extra=upload_doc)
    async def post_upload(request: Request) -> JSONResponse:
        got = await _uploaded_bytes(request, settings.max_upload_bytes)
        if isinstance(got, JSONResponse):
            return got
        data, original = got
        kind = sniff_image(data)
        if kind is None:
            return _error(415, "only PNG, JPEG and WebP images are accepted")
        try:
            width, height = await asyncio.to_thread(_verify_image, data)
        except Exception as exc:
            return _error(400, f"the {kind.upper()} file is damaged or too large to decode: {exc}")
        digest = hashlib.sha256(data).hexdigest()[:12]
        name = f"{_safe_stem(original)}-{digest}.{'jpg' if kind == 'jpeg' else kind}"
        root = paths.input_dir()
        target = paths.confine(root, name)
        if not target.exists():  # same content, same name: nothing to write
            await asyncio.to_thread(atomic_write, target, data)
        return JSONResponse({"name": name, "size": len(data), "format": kind, "width": width, "height": height})

    @router.post("/workflow-from-png", summary="The workflow embedded in a ditgraph PNG (text key 'workflow')",
                 openapi_extra=upload_doc)
    async def post_workflow_from_png(request: Request) -> JSONResponse:
        got = await _uploaded_bytes(request, settings.max_upload_bytes)
        if isinstance(got, JSONResponse):
            return got
        data, _ = got
        from app.fronts.comfy import embedded_texts  # PNG text chunks, WEBP EXIF or video tags

        try:
            texts = embedded_texts(data)
        except ValueError as exc:
            return _error(415, str(exc))
        return _workflow_from_texts(texts, state)

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

    def locate(name: str, sources=("user", "shipped")) -> tuple[Path | None, JSONResponse | None]:
        relative = _workflow_relpath(name)
        if relative is None:
            return None, _error(400, f"bad workflow name {name!r}: letters, digits, spaces and ._-()+, only; "
                                     "up to 4 folders; no leading dot")
        for source in sources:
            root = settings.workflows_dir if source == "user" else settings.shipped_workflows_dir
            try:
                path = paths.confine(root, relative)
            except paths.PathRefused as exc:
                return None, _error(403, str(exc))
            if path.is_file():
                return path, None
        return None, _error(404, f"no workflow {name!r}")

    @router.get("/workflows/{name:path}", summary="One workflow document (user folder first, then shipped)")
    def get_workflow(name: str, source: str | None = Query(None, pattern="^(user|shipped)$")) -> Response:
        path, problem = locate(name, (source,) if source else ("user", "shipped"))
        if problem:
            return problem
        try:
            return JSONResponse(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            return _error(422, f"cannot read {name!r}: {exc}")

    @router.put("/workflows/{name:path}", summary="Save a workflow into the user folder (replaces it)")
    def put_workflow(name: str, document: Any = Body(...)) -> JSONResponse:  # noqa: B008 - FastAPI's idiom
        relative = _workflow_relpath(name)
        if relative is None:
            return _error(400, f"bad workflow name {name!r}")
        try:
            workflow = Workflow.from_dict(document)
            target = paths.confine(settings.workflows_dir, relative)
        except WorkflowError as exc:
            return _problems_response(exc)
        except paths.PathRefused as exc:
            return _error(403, str(exc))
        atomic_write(target, (workflow.to_json() + "\n").encode("utf-8"))
        return JSONResponse({"name": relative[: -len(".json")], "source": "user", "saved": True})

    @router.delete("/workflows/{name:path}", summary="Delete a user workflow")
    def delete_workflow(name: str) -> JSONResponse:
        path, problem = locate(name, ("user",))
        if problem:
            if problem.status_code == 404 and locate(name, ("shipped",))[0] is not None:
                return _error(403, f"{name!r} is a shipped example and read-only")
            return problem
        path.unlink()
        return JSONResponse({"name": name, "deleted": True})

    @router.post("/workflows/{name:path}/rename", summary="Rename (move) a user workflow")
    def rename_workflow(name: str, body: RenameRequest) -> JSONResponse:
        path, problem = locate(name, ("user",))
        if problem:
            return problem
        relative = _workflow_relpath(body.new_name)
        if relative is None:
            return _error(400, f"bad workflow name {body.new_name!r}")
        try:
            target = paths.confine(settings.workflows_dir, relative)
        except paths.PathRefused as exc:
            return _error(403, str(exc))
        if target.exists():
            return _error(409, f"a workflow named {body.new_name!r} already exists")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        return JSONResponse({"name": relative[: -len(".json")], "renamed_from": name})

    @router.get("/models", summary="What the models folder holds, by kind")
    def get_models() -> JSONResponse:
        return JSONResponse({"models_dir": str(paths.models_dir()),
                             "kinds": {kind: paths.list_files(kind) for kind in paths.MODEL_KINDS}})

    @router.get("/status", summary="Version, device, memo cache, queue")
    def get_status() -> JSONResponse:
        counts = queue().store.counts()
        engine = state.engine
        device = {"name": str(engine.device)}
        if engine.device.type == "cuda":
            with contextlib.suppress(Exception):
                import torch

                free, total = torch.cuda.mem_get_info(engine.device)
                device.update(gpu=torch.cuda.get_device_name(engine.device), memory_free=free, memory_total=total)
        return JSONResponse({
            "version": app_package.__version__,
            "device": device,
            "memo": engine.cache.summary(),
            "queue": {"queued": counts.get("queued", 0), "running": counts.get("running", 0),
                      "finished": sum(counts.get(s, 0) for s in ("success", "failed", "cancelled"))},
            "dispatcher": queue().dispatcher.describe(),
            "nodes": len(state.registry.nodes),
            "load_errors": [{"source": e.source, "message": e.message} for e in state.registry.load_errors],
            "uptime": round(time.time() - state.started_at, 1),
            "auth": bool(settings.token),
        })

    @router.websocket("/events")
    async def events(websocket: WebSocket, client_id: str | None = None, mode: str = "own") -> None:
        await websocket.accept()
        if client_id is None or not (0 < len(client_id) <= 200):
            client_id = os.urandom(8).hex()
        connection = _Connection(client_id, mode == "all", asyncio.get_running_loop(), asyncio.Queue(maxsize=2000))
        state.add_connection(connection)
        counts = queue().store.counts()
        await websocket.send_text(json.dumps({"type": "hello", "client_id": client_id, "mode": "all" if connection.all_runs else "own",
                                              "queued": counts.get("queued", 0), "running": counts.get("running", 0)}))

        async def pump() -> None:
            while True:
                await websocket.send_text(await connection.outbox.get())

        sender = asyncio.create_task(pump())
        try:
            while True:
                message = await websocket.receive_text()
                if message == "ping":
                    await websocket.send_text(json.dumps({"type": "pong"}))
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            state.remove_connection(connection)
            sender.cancel()

    return router


def _verify_image(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        size = image.size
        if size[0] * size[1] > 16384 * 16384:
            raise ValueError(f"{size[0]}x{size[1]} pixels is too large")
        image.verify()
    return size


def _workflow_from_texts(texts: dict[str, str], state: AppState) -> JSONResponse:
    raw = texts.get("workflow")
    if raw is not None:
        try:
            document = json.loads(raw)
        except ValueError:
            return _error(422, "the PNG's 'workflow' text is not valid JSON")
        if isinstance(document, dict) and document.get("format") == FORMAT:
            try:
                Workflow.from_dict(document)
            except WorkflowError as exc:
                return _problems_response(exc, 422)
            return JSONResponse({"workflow": document, "source": "ditgraph"})
    if "prompt" in texts or raw is not None:  # a ComfyUI file: its editor graph or its API-format 'prompt'
        from app.fronts.comfy import ComfyImportError, import_texts

        try:
            workflow = import_texts(texts, state.registry)
        except ComfyImportError as exc:
            return _error(422, str(exc), unmapped=exc.unmapped)
        except ValueError as exc:
            return _error(422, f"this file carries a ComfyUI workflow that cannot be imported: {exc}")
        return JSONResponse({"workflow": workflow, "source": "comfyui"})
    return _error(422, "this PNG carries no ditgraph workflow (no 'workflow' text chunk)")


# -- assembling the app ----------------------------------------------------------------------------------

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
    nicegui_app.add_exception_handler(RequestValidationError, _validation_error)
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


__all__ = ["AppState", "ConfigError", "QueueLocked", "Settings", "create_app", "serve", "build_router"]
