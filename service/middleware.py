"""ASGI middleware: request ids, body-size limit, drain gate, per-route metrics, access log, audit hook."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

request_id_var: ContextVar[str] = ContextVar("request_id", default="-")
_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
log = logging.getLogger("service.access")

# Operational endpoints: always answered (also while draining), never audited.
OPS_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
UNAUDITED_PATHS = OPS_PATHS | {"/", "/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect", "/favicon.ico"}


def _json_error(status: int, code: str, message: str, request_id: str,
                extra_headers: Iterable[tuple[bytes, bytes]] = ()) -> tuple[Message, bytes]:
    body = json.dumps({"error": {"code": code, "message": message, "request_id": request_id}}).encode()
    start: Message = {"type": "http.response.start", "status": status,
                      "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                  *extra_headers]}
    return start, body


class RequestContextMiddleware:
    """Accepts or makes X-Request-ID, enforces the body limit (413), answers 503 while draining,
    records metrics and one access-log line, and hands every finished request to `on_finish` (audit).

    The body is read (up to the limit) before the app runs, so an oversized body is a 413 however it
    is sent (Content-Length or chunked) and never reaches the JSON parser.
    """

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, metrics: Any,
                 is_draining: Callable[[], bool] = lambda: False,
                 known_paths: Callable[[], set[str]] = set,
                 on_finish: Callable[[dict[str, Any], str, int, float], None] | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.is_draining = is_draining
        self.known_paths = known_paths
        self.on_finish = on_finish

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _VALID_ID.match(given) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = request_id
        started = time.perf_counter()
        status_holder = {"status": 500}
        path = scope.get("path", "")

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            if self.is_draining() and path not in OPS_PATHS:
                state["error_code"] = "draining"
                await self._reply(send_wrapper, 503, "draining",
                                  "the server is shutting down; retry on another instance", request_id,
                                  [(b"retry-after", b"5"), (b"connection", b"close")])
                return
            body = await self._read_body(scope, receive)
            if body is None:
                state["error_code"] = "payload_too_large"
                await self._reply(send_wrapper, 413, "payload_too_large",
                                  f"the body is over {self.max_body_bytes} bytes", request_id,
                                  [(b"connection", b"close")])
                return
            if scope.get("method") == "POST":
                scope["headers"] = _json_content_type(scope.get("headers") or [])
            await self.app(scope, _replay(body, receive), send_wrapper)
        finally:
            status = status_holder["status"]
            route = self._route(scope, path)
            elapsed = time.perf_counter() - started
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(elapsed)
            # Route template only: a query string may hold patient text.
            log.info("request", extra={"method": scope.get("method"), "route": route, "status": status,
                                       "ms": round(elapsed * 1000, 1)})
            if self.on_finish is not None and path not in UNAUDITED_PATHS and not path.startswith("/static"):
                try:
                    self.on_finish(state, route, status, elapsed)
                except Exception:  # noqa: BLE001 - auditing must not break a response
                    logging.getLogger(__name__).exception("audit hook failed")
            request_id_var.reset(token)

    def _route(self, scope: Scope, path: str) -> str:
        """A bounded label: the matched route template, a known path, or 'unmatched'."""
        route = getattr(scope.get("route"), "path", None)
        if route:
            return route
        return path if path in self.known_paths() else "unmatched"

    async def _read_body(self, scope: Scope, receive: Receive) -> list[Message] | None:
        """All request messages up to the end of the body; None when the body is over the limit."""
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_body_bytes:
            return None
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return messages  # http.disconnect: let the app see it
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                return None
            if not message.get("more_body", False):
                break
        if len(messages) > 1:
            body = b"".join(m.get("body", b"") for m in messages)
            messages = [{"type": "http.request", "body": body, "more_body": False}]
        return messages

    @staticmethod
    async def _reply(send: Send, status: int, code: str, message: str, request_id: str,
                     headers: list[tuple[bytes, bytes]]) -> None:
        start, body = _json_error(status, code, message, request_id, headers)
        await send(start)
        await send({"type": "http.response.body", "body": body})


_LOOSE_TYPES = (b"application/x-www-form-urlencoded", b"text/plain")


def _json_content_type(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Every POST body of this API is JSON: `curl -d` (form-urlencoded) and text/plain bodies are read as JSON,
    as the original ChatGLM api.py did (it called request.json() whatever the header said)."""
    return [(name, b"application/json") if name == b"content-type" and value.split(b";")[0].strip().lower()
            in _LOOSE_TYPES else (name, value) for name, value in headers]


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A receive() that gives the buffered body first, then the real channel (for disconnects)."""
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay
