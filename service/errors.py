"""One error shape everywhere: {"error": {"code", "message", "request_id"}}; one place maps exceptions."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine.types import EngineNotReady, PromptTooLong, QueueFull, UpstreamError

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error the caller should see, with a stable code."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_body(code: str, message: str, request_id: str | None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message, "request_id": request_id}
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
    if isinstance(exc, EngineNotReady):
        return APIError(503, "not_ready", str(exc), {"Retry-After": "5"})
    if isinstance(exc, UpstreamError):
        return APIError(503, "upstream_unavailable", str(exc), {"Retry-After": "5"})
    return APIError(500, "internal_error", "internal server error")


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def _validation_message(errors: list[dict[str, Any]]) -> str:
    parts = []
    for err in errors[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message, _request_id(request)), exc.status, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse(error_body("invalid_json", "the body is not valid UTF-8 JSON", _request_id(request)),
                                400)
        details = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
                   for e in errors[:20]]
        return JSONResponse(
            error_body("invalid_request", _validation_message(errors), _request_id(request), details=details), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized", 413: "payload_too_large"}
        return JSONResponse(error_body(codes.get(exc.status_code, "http_error"), str(exc.detail),
                                       _request_id(request)), exc.status_code, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        mapped = to_api_error(exc)
        if mapped.status >= 500 and mapped.code == "internal_error":
            log.exception("unhandled error")
        return JSONResponse(error_body(mapped.code, mapped.message, _request_id(request)), mapped.status,
                            mapped.headers)
