"""The guard in front of every request: token, same-origin and Host (DNS rebinding) rules, body size cap.

Loopback only unless a token is set; with a token every request needs it (Authorization: Bearer,
?token= or the cookie set by visiting /?token=...); browser requests from another origin are
refused unless they carry the token explicitly; the Host header must name this machine when no
token is set.
"""

from __future__ import annotations

import contextlib
import hmac
import json
from http.cookies import SimpleCookie
from urllib.parse import parse_qs, urlsplit

from app.fronts.http.settings import LOOPBACK_NAMES, Settings, is_loopback

TOKEN_COOKIE = "ditgraph_token"
UPLOAD_PATHS = ("/api/uploads", "/api/workflow-from-png")  # the routes whose bodies are files, not JSON


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
            limit = self._body_limit(scope["path"])
            if length is not None:
                if not length.isdigit():
                    return await self._refuse(scope, receive, send, 400, "bad Content-Length")
                if int(length) > limit:
                    return await self._refuse(scope, receive, send, 413, f"request body over the {limit}-byte limit")
            # a page visited as /?token=T remembers the token in a same-site cookie
            if explicit_ok and not cookie_ok and not scope["path"].startswith("/api") and scope.get("method") == "GET":
                send = _with_cookie(send, token)
            receive = _capped(receive, limit)  # bodies without a Content-Length (chunked) too
        return await self.app(scope, receive, send)

    def _body_limit(self, path: str) -> int:
        """Image uploads may be large (plus multipart overhead); every other body is JSON."""
        if path in UPLOAD_PATHS:
            return self.settings.max_upload_bytes + 64 * 1024
        return self.settings.max_json_bytes

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
                raise BodyTooLarge(f"request body over the {limit}-byte limit")
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
