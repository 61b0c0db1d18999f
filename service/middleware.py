"""ASGI middleware: request ids, the checks that come before any body is read (drain, URL length, Host,
API key, media type), the body limits (size, deadline, a client that leaves), per-route metrics, access log,
audit hook."""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import UNAUTHORIZED, KeyChecker, key_from_headers
from .errors import error_body, to_api_error

request_id_var: ContextVar[str] = ContextVar("request_id", default="-")
_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
log = logging.getLogger("service.access")

# Operational endpoints: always answered (also while draining), never audited.
OPS_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
DOC_PATHS = frozenset({"/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"})
UNAUDITED_PATHS = OPS_PATHS | DOC_PATHS | {"/", "/favicon.ico"}
# Open without a key whatever the settings: the probes, and the chat page (static; it asks for the key).
ALWAYS_OPEN = frozenset({"/healthz", "/readyz", "/", "/favicon.ico"})
# Every POST body of this API is JSON; these are read as JSON too (ChatGLM api.py clients, `curl -d`).
_LOOSE_TYPES = (b"application/x-www-form-urlencoded", b"text/plain")
_JSON_TYPES = (b"application/json", *_LOOSE_TYPES)
# On every response: no MIME sniffing, no framing by other sites, no Referer with our paths.
SECURITY_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer"))


@dataclass(frozen=True)
class RequestLimits:
    """What the middleware enforces, from the settings."""

    max_body_bytes: int = 1_000_000
    body_timeout_s: float = 15.0
    max_url_chars: int = 8192
    max_header_bytes: int = 16_384
    trusted_hosts: tuple[str, ...] = ()  # empty: any Host
    open_paths: frozenset[str] = ALWAYS_OPEN | OPS_PATHS | DOC_PATHS  # answered without a key

    @classmethod
    def from_settings(cls, settings: Any) -> RequestLimits:
        open_paths = set(ALWAYS_OPEN)
        if not settings.protect_docs:
            open_paths |= DOC_PATHS
        if not settings.protect_metrics:
            open_paths.add("/metrics")
        return cls(max_body_bytes=settings.max_body_bytes, body_timeout_s=settings.body_timeout_s,
                   max_url_chars=settings.max_url_chars, max_header_bytes=settings.max_header_bytes,
                   trusted_hosts=tuple(settings.trusted_host_list()),
                   open_paths=frozenset(open_paths))


def host_allowed(host_header: str, trusted: tuple[str, ...]) -> bool:
    """The Host header (port dropped) matches a trusted name; `*.example.org` matches its subdomains."""
    if not trusted:
        return True
    host = host_header.strip().lower()
    host = host[: host.index("]") + 1] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
    return any(host == pattern or (pattern.startswith("*.") and fnmatch.fnmatchcase(host, pattern))
               for pattern in trusted)


def _json_error(status: int, code: str, message: str, request_id: str,
                extra_headers: Iterable[tuple[bytes, bytes]] = ()) -> tuple[Message, bytes]:
    body = json.dumps(error_body(status, code, message, request_id)).encode()
    start: Message = {"type": "http.response.start", "status": status,
                      "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                  *extra_headers]}
    return start, body


class RequestContextMiddleware:
    """Accepts or makes X-Request-ID; answers, before reading any body: 503 while draining, 414 for an
    over-long URL, 400 for an untrusted Host, 401 without a valid key (protected paths), 415 for a non-JSON
    body; then reads the body within its size (413) and deadline (408), records 499 when the client leaves
    mid-body, records metrics and one access-log line, and hands every finished request to `on_finish` (audit).

    The body is read (up to the limit) before the app runs, so an oversized body is a 413 however it
    is sent (Content-Length or chunked) and never reaches the JSON parser.
    """

    def __init__(self, app: ASGIApp, *, limits: RequestLimits, metrics: Any, keys: KeyChecker | None = None,
                 is_draining: Callable[[], bool] = lambda: False,
                 known_paths: Callable[[], set[str]] = set,
                 on_finish: Callable[[dict[str, Any], str, int, float], None] | None = None) -> None:
        self.app = app
        self.limits = limits
        self.metrics = metrics
        self.keys = keys or KeyChecker([])
        self.is_draining = is_draining
        self.known_paths = known_paths
        self.on_finish = on_finish

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        given = headers.get("x-request-id", "")
        request_id = given if _VALID_ID.match(given) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = request_id
        started = time.perf_counter()
        status_holder = {"status": 500, "started": False}
        path = scope.get("path", "")

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                status_holder["started"] = True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode()),
                                      *SECURITY_HEADERS]
            await send(message)

        async def refuse(status: int, code: str, message: str, extra: Iterable[tuple[bytes, bytes]] = ()) -> None:
            state["error_code"] = code
            await self._reply(send_wrapper, status, code, message, request_id, list(extra))

        try:
            refusal = self._refusal_before_body(scope, headers, path, state)
            if refusal is not None:  # the body was not read: close, so that nobody drips one in afterwards
                status, code, message, *extra = refusal
                await refuse(status, code, message, [*(extra[0] if extra else []), (b"connection", b"close")])
                return
            body = await self._read_body(receive, headers)
            if body == "too_large":
                await refuse(413, "payload_too_large", f"the body is over {self.limits.max_body_bytes} bytes",
                             [(b"connection", b"close")])
                return
            if body == "timeout":
                await refuse(408, "body_timeout", f"the body did not arrive within {self.limits.body_timeout_s} s",
                             [(b"connection", b"close")])
                return
            if body == "disconnected":  # nobody to answer: recorded as nginx does
                state["error_code"] = "client_closed"
                status_holder["status"] = 499
                return
            if scope.get("method") == "POST":
                scope["headers"] = _json_content_type(scope.get("headers") or [])
            try:
                await self.app(scope, _replay(body, receive), send_wrapper)
            except Exception as exc:
                if status_holder["started"]:
                    raise
                mapped = to_api_error(exc)  # the one error shape, and the audit record says what failed
                if mapped.code == "internal_error":
                    logging.getLogger(__name__).exception("unhandled error")
                await refuse(mapped.status, mapped.code, mapped.message,
                             [(k.lower().encode(), v.encode()) for k, v in mapped.headers.items()])
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

    def _refusal_before_body(self, scope: Scope, headers: Headers, path: str,
                             state: dict[str, Any]) -> tuple[Any, ...] | None:
        """(status, code, message[, headers]) when the request is refused before its body is read."""
        if self.is_draining() and path not in OPS_PATHS:
            return (503, "draining", "the server is shutting down; retry on another instance",
                    [(b"retry-after", b"5")])
        if len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") > self.limits.max_url_chars:
            return 414, "uri_too_long", f"the URL is over {self.limits.max_url_chars} characters"
        # The protocol bounds a head that arrives in pieces; one that arrives whole is measured here.
        if sum(len(name) + len(value) + 4 for name, value in scope.get("headers") or []) > self.limits.max_header_bytes:
            return 431, "headers_too_large", f"the request headers are over {self.limits.max_header_bytes} bytes"
        if not host_allowed(headers.get("host", ""), self.limits.trusted_hosts):
            return 400, "invalid_host", "the Host header is not one this server answers for"
        if self.keys.enabled and scope.get("method") != "OPTIONS" and path not in self.limits.open_paths:
            found = self.keys.check(key_from_headers(headers))
            if found is None:  # before the body: a caller without a key cannot make us read one
                return 401, "unauthorized", UNAUTHORIZED, [(b"www-authenticate", b"Bearer")]
            state["key_id"] = found
        if scope.get("method") == "POST" and not _is_json_type(headers.get("content-type")):
            return 415, "unsupported_media_type", "the body must be JSON (Content-Type: application/json)"
        return None

    def _route(self, scope: Scope, path: str) -> str:
        """A bounded label: the matched route template, a known path, or 'unmatched'."""
        route = getattr(scope.get("route"), "path", None)
        if route:
            return route
        return path if path in self.known_paths() else "unmatched"

    async def _read_body(self, receive: Receive, headers: Headers) -> list[Message] | str:
        """All request messages up to the end of the body, or why not: too_large, timeout, disconnected."""
        declared = headers.get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.limits.max_body_bytes:
            return "too_large"
        messages: list[Message] = []
        size = 0
        try:
            async with asyncio.timeout(self.limits.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        return "disconnected"
                    messages.append(message)
                    size += len(message.get("body", b""))
                    if size > self.limits.max_body_bytes:
                        return "too_large"
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            return "timeout"
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


def _is_json_type(content_type: str | None) -> bool:
    """No Content-Type, JSON (also `application/*+json`), or one of the loose types read as JSON."""
    if not content_type:
        return True
    media = content_type.split(";")[0].strip().lower().encode()
    return media in _JSON_TYPES or (media.startswith(b"application/") and media.endswith(b"+json"))



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
