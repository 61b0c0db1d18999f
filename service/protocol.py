"""The HTTP/1.1 protocol the server runs: uvicorn's h11 protocol with the limits that must hold before any
key is checked, and the one JSON error shape for what is refused there.

- a header timer per request: from connect (or the previous response) to the end of the headers; a client
  that sent part of a request then stops gets 408, one that sent nothing is closed;
- a cap on open connections: one over the cap is answered 503 and closed at once;
- request line + headers over `max_header_bytes` (h11's incomplete-event limit): 431, or 414 when the
  request line alone is the long part; any other unparsable request (a bad Content-Length, a broken
  request line): 400 — all as JSON instead of uvicorn's plain text.

The body deadline and the URL length of a parsed request are checked in the ASGI middleware.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import error_body
from .settings import Settings

log = logging.getLogger("service.protocol")
_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 414: b"URI Too Long",
            431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}


def json_error_bytes(status: int, code: str, message: str,
                     extra_headers: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    """A whole HTTP/1.1 response (the one error shape) that closes the connection, for replies written
    before a request exists (no request id yet)."""
    body = json.dumps(error_body(status, code, message, None)).encode()
    head = [b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, b"Error")), b"content-type: application/json",
            b"content-length: %d" % len(body), b"connection: close",
            *(name + b": " + value for name, value in extra_headers)]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class GuardedH11Protocol(H11Protocol):
    """Set the limits with `guarded_protocol(settings)`; the class defaults are the settings' defaults."""

    header_timeout_s: float = 10.0
    max_connections: int = 256
    max_url_chars: int = 8192
    max_header_bytes: int = 16_384

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0  # bytes of the request being read, while its headers are incomplete

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            log.warning("connection refused", extra={"reason": "too_many_connections",
                                                     "open": len(self.connections)})
            self._refuse(503, "too_many_connections", "the server has too many open connections; retry shortly",
                         ((b"retry-after", b"1"),))
            return
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:
            self._head_bytes += len(data)
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the headers are in (or the connection failed)
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.IDLE:  # keep-alive: the next request gets its own header timer
            self._head_bytes = len(self.conn.trailing_data[0])
            self._arm_header_timer()
        else:
            self._cancel_header_timer()

    def send_400_response(self, msg: str) -> None:
        """h11 could not parse the request: say why, as JSON."""
        pending = self.conn.trailing_data[0]
        if len(pending) > self.max_header_bytes:
            first_line = pending.split(b"\n", 1)[0]
            if b"\n" not in pending or len(first_line) > self.max_url_chars:
                self._refuse(414, "uri_too_long", f"the request line is over {self.max_url_chars} characters")
            else:
                self._refuse(431, "headers_too_large",
                             f"the request line and headers are over {self.max_header_bytes} bytes")
            return
        self._refuse(400, "bad_request", "malformed HTTP request (request line, a header, or Content-Length)")

    def _refuse(self, status: int, code: str, message: str,
                extra_headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        self._cancel_header_timer()
        if not self.transport.is_closing():
            self.transport.write(json_error_bytes(status, code, message, extra_headers))
            self.transport.close()

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self._head_bytes == 0:  # an idle connection: close it quietly, as keep-alive does
            self.transport.close()
            return
        log.warning("connection closed", extra={"reason": "header_timeout", "seconds": self.header_timeout_s})
        self._refuse(408, "header_timeout", f"the request headers did not arrive within {self.header_timeout_s} s")


def guarded_protocol(settings: Settings) -> type[GuardedH11Protocol]:
    """The protocol class with this deployment's limits (uvicorn makes one instance per connection)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {
        "header_timeout_s": settings.header_timeout_s, "max_connections": settings.max_connections,
        "max_url_chars": settings.max_url_chars, "max_header_bytes": settings.max_header_bytes})
