"""One error shape everywhere, built in one place (error_body): {"error": {"code", "message", "request_id",
"type", "param"}} — `type` and `param` as OpenAI's clients read them; one place maps exceptions."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine.types import EngineNotReady, Finished, InvalidPrompt, NotSupported, PromptTooLong, QueueFull, UpstreamError

log = logging.getLogger(__name__)
BAD_JSON = "the body is not valid UTF-8 JSON"


class APIError(Exception):
    """An error the caller should see, with a stable code."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 429: "rate_limit_error"}


def error_type(status: int) -> str:
    """OpenAI's error `type` for a status."""
    if status in _TYPES:
        return _TYPES[status]
    return "server_error" if status >= 500 else "invalid_request_error"


def error_body(status: int, code: str, message: str, request_id: str | None, param: str | None = None,
               **extra: Any) -> dict[str, Any]:
    """The one error body of every endpoint (JSON responses, SSE `error` events, refusals before a request)."""
    body: dict[str, Any] = {"code": code, "message": message, "request_id": request_id,
                            "type": error_type(status), "param": param}
    body.update(extra)
    return {"error": body}


def to_api_error(exc: Exception, retry_after_s: int = 1) -> APIError:
    """Map engine exceptions to API errors (used by routes and by the SSE error event)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFull):
        return APIError(429, "queue_full", f"{exc}; retry later", {"Retry-After": str(retry_after_s)})
    if isinstance(exc, PromptTooLong):
        return APIError(422, "prompt_too_long", str(exc))
    if isinstance(exc, InvalidPrompt):
        return APIError(422, "invalid_request", str(exc))
    if isinstance(exc, NotSupported):
        return APIError(400, "not_supported", str(exc))
    if isinstance(exc, EngineNotReady):
        return APIError(503, "not_ready", str(exc), {"Retry-After": "5"})
    if isinstance(exc, UpstreamError):
        return APIError(503, "upstream_unavailable", str(exc), {"Retry-After": "5"})
    return APIError(500, "internal_error", "internal server error")


def finished_error(done: Finished | None) -> APIError:
    """A generation that ended without an answer: the drain ended it (503 shutting_down), or the engine
    failed for it (500 generation_failed). One mapping for every route, streamed or not."""
    if done is not None and done.finish_reason == "cancelled":
        return APIError(503, "shutting_down", done.error or "the server is shutting down", {"Retry-After": "5"})
    return APIError(500, "generation_failed", (done.error if done is not None else None) or "generation did not finish")


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def _reply(request: Request, status: int, code: str, message: str, headers: dict[str, str] | None = None,
           **extra: Any) -> JSONResponse:
    request.state.error_code = code  # for the audit record
    return JSONResponse(error_body(status, code, message, _request_id(request), **extra), status, headers)


def _validation_message(errors: list[dict[str, Any]]) -> str:
    parts = []
    for err in errors[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def _param(errors: list[dict[str, Any]]) -> str | None:
    """The first invalid field, dotted (`messages.0.content`), as OpenAI's `param`."""
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query")]
        if loc:
            return ".".join(loc)
    return None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _reply(request, exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            return _reply(request, 400, "invalid_json", BAD_JSON)
        # No `input` in the details: it may be patient text, and it is echoed to logs by proxies.
        details = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
                   for e in errors[:20]]
        return _reply(request, 422, "invalid_request", _validation_message(errors), param=_param(errors),
                      details=details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI's "error parsing the body": bad UTF-8 and other undecodable bodies
            return _reply(request, 400, "invalid_json", BAD_JSON)
        codes = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized", 413: "payload_too_large"}
        return _reply(request, exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail),
                      getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        mapped = to_api_error(exc)
        if mapped.status >= 500 and mapped.code == "internal_error":
            log.exception("unhandled error")
        return _reply(request, mapped.status, mapped.code, mapped.message, mapped.headers)
