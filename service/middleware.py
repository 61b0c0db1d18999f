"""ASGI middleware: request ids, body-size limit, per-route metrics."""

from __future__ import annotations

import json
import re
import time
import uuid
from contextvars import ContextVar
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

request_id_var: ContextVar[str] = ContextVar("request_id", default="-")
_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _json_error(status: int, code: str, message: str, request_id: str) -> tuple[dict[str, Any], bytes]:
    body = json.dumps({"error": {"code": code, "message": message, "request_id": request_id}}).encode()
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         (b"x-request-id", request_id.encode())]}
    return start, body


class RequestContextMiddleware:
    """Accepts or makes X-Request-ID, enforces the body limit (413), records metrics."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, metrics: Any) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _VALID_ID.match(given) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status_holder = {"status": 500}
        route = scope.get("path", "")

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            declared = headers.get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
                await self._reject(send, request_id, status_holder)
                return
            received = 0
            too_big = False

            async def limited_receive() -> Message:
                nonlocal received, too_big
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_body_bytes:
                        too_big = True
                        raise _BodyTooLarge
                return message

            try:
                await self.app(scope, limited_receive, send_wrapper)
            except _BodyTooLarge:
                await self._reject(send, request_id, status_holder)
        finally:
            route_obj = scope.get("route")
            route = getattr(route_obj, "path", None) or ("unmatched" if status_holder["status"] == 404 else route)
            self.metrics.requests.labels(route, str(status_holder["status"])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
            request_id_var.reset(token)

    async def _reject(self, send: Send, request_id: str, status_holder: dict[str, int]) -> None:
        start, body = _json_error(413, "payload_too_large", f"the body is over {self.max_body_bytes} bytes",
                                  request_id)
        status_holder["status"] = 413
        await send(start)
        await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    pass
