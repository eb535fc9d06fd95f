"""HTTP hardening shared by the hub server and the model server (``adapterkit.serve``).

- ``BodyLimit``: ASGI middleware capping every request body (by ``Content-Length`` and while
  streaming), with per-path exceptions for uploads that enforce their own, larger limit.
- ``SecurityHeaders``: ``X-Content-Type-Options: nosniff``, ``frame-ancestors 'none'``, a strict
  Content-Security-Policy on HTML pages, ``Referrer-Policy``.
- ``FailedAuthLimiter``: after too many failed token checks from one client address, answer 429
  for a while instead of checking more tokens.
- ``SafeJSONResponse``: JSON with non-ASCII escaped, so a lone surrogate can never make rendering
  an answer fail (a 500).
- ``validation_detail``: a request-validation error said without echoing the input.

Pure ASGI rather than ``@app.middleware("http")``: it costs less per request and sees the raw
body stream.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from .names import has_surrogate

DEFAULT_BODY_LIMIT = 64 << 10
# Failed token checks per client address allowed in AUTH_WINDOW_S seconds before 429s.
AUTH_FAILURES_MAX = 10
AUTH_WINDOW_S = 60.0
AUTH_CLIENTS_TRACKED = 10_000

# Pages are server-rendered with one small script file of our own and one stylesheet; nothing
# else may load, run, or frame them.
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
# FastAPI's /docs page loads Swagger UI from a CDN with an inline bootstrap script; it gets framing
# and sniffing protection but not the page policy (which would blank it).
DOCS_PATHS = ("/docs", "/redoc", "/docs/oauth2-redirect")


class SafeJSONResponse(JSONResponse):
    """``JSONResponse`` with ``ensure_ascii``: any ``str`` (lone surrogates included) renders."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def validation_detail(errors: Iterable[dict[str, Any]], limit: int = 5) -> str:
    """``field: what is wrong; ...`` from pydantic errors, never quoting the input itself."""
    parts = []
    for err in list(errors)[:limit]:
        where = ".".join(str(x)[:64] for x in err.get("loc", ()) if x not in ("query", "path", "body", "header"))
        parts.append(f"{where or 'body'}: {str(err.get('msg', 'invalid'))[:200]}")
    return "; ".join(parts) or "invalid request"


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413, whether announced by Content-Length or
    streamed. ``exempt(method, path)`` -> True for endpoints that enforce their own limit."""

    def __init__(
        self,
        app: Any,
        limit: int = DEFAULT_BODY_LIMIT,
        exempt: Callable[[str, str], bool] | None = None,
        error_key: str = "error",
    ):
        self.app, self.limit, self.exempt, self.error_key = app, limit, exempt, error_key

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or (self.exempt is not None and self.exempt(scope["method"], scope["path"])):
            await self.app(scope, receive, send)
            return
        limit = self.limit
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                if not value.isdigit() or int(value) > limit:
                    await self._refuse(send, f"request body over {limit} bytes (Content-Length {value[:20].decode('latin-1')!r})")
                    return
        seen = 0
        started = False

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # An HTTPException: FastAPI re-raises it from body parsing (any other error
                    # there becomes a 400), and the app's handler answers it as a 413.
                    raise _TooLarge(413, f"request body over {limit} bytes")
            return message

        async def watched(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except _TooLarge as e:
            if not started:
                await self._refuse(send, str(e.detail))

    async def _refuse(self, send: Callable, message: str) -> None:
        body = SafeJSONResponse({self.error_key: message}).body
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                # close: the rest of the body is not read, so the connection cannot be reused
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLarge(HTTPException):
    pass


class SecurityHeaders:
    """Add protective headers to every answer (the HTML policy to HTML answers only)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        docs = scope["path"] in DOCS_PATHS

        async def add_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                ctype = next((v for k, v in headers if k.lower() == b"content-type"), b"")
                extra = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer")]
                if ctype.startswith(b"text/html") and not docs:
                    extra.append((b"content-security-policy", PAGE_CSP.encode()))
                else:
                    extra.append((b"content-security-policy", b"frame-ancestors 'none'"))
                headers += [(k, v) for k, v in extra if k not in names]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, add_headers)


class FailedAuthLimiter:
    """Count failed authentications per client address in a sliding window.

    ``blocked(client)`` -> seconds to wait (0 when allowed); ``failed(client)`` records one failure.
    Memory is bounded: the least recently seen addresses are forgotten past ``max_clients``.
    """

    def __init__(self, max_failures: int = AUTH_FAILURES_MAX, window_s: float = AUTH_WINDOW_S, max_clients: int = AUTH_CLIENTS_TRACKED):
        self.max_failures, self.window_s, self.max_clients = max_failures, window_s, max_clients
        self._failures: OrderedDict[str, list[float]] = OrderedDict()
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> list[float]:
        times = [t for t in self._failures.get(client, []) if now - t < self.window_s]
        if times:
            self._failures[client] = times
            self._failures.move_to_end(client)
        else:
            self._failures.pop(client, None)
        return times

    def blocked(self, client: str) -> float:
        now = time.monotonic()
        with self._lock:
            times = self._recent(client, now)
            if len(times) < self.max_failures:
                return 0.0
            return max(0.0, self.window_s - (now - times[0]))

    def failed(self, client: str) -> None:
        now = time.monotonic()
        with self._lock:
            times = self._recent(client, now)
            times.append(now)
            self._failures[client] = times[-self.max_failures :]
            self._failures.move_to_end(client)
            while len(self._failures) > self.max_clients:
                self._failures.popitem(last=False)


def client_address(scope_or_request: Any) -> str:
    """The peer address of a request (the socket's, never a header a client can set)."""
    client = getattr(scope_or_request, "client", None)
    if client is None and isinstance(scope_or_request, dict):
        client = scope_or_request.get("client")
    return str(client[0]) if client else "unknown"


__all__ = [
    "BodyLimit",
    "DEFAULT_BODY_LIMIT",
    "FailedAuthLimiter",
    "PAGE_CSP",
    "SafeJSONResponse",
    "SecurityHeaders",
    "client_address",
    "has_surrogate",
    "validation_detail",
]
