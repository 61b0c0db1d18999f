"""Event translation: the engine's TokenDelta / Finished become meta / delta / done / error events, with
metrics, and the audit record written whatever way the turn ended."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from .chat_audit import audit_chat
from .chat_turn import ChatStart
from .engine.types import EngineError, Finished, TokenDelta
from .errors import error_body, finished_error, to_api_error
from .runtime import Runtime


def meta_event(start: ChatStart) -> dict[str, Any]:
    return {"id": start.id, "request_id": start.request_id, "keywords": start.designed.keywords,
            "references": start.designed.references, "uncertain": bool(start.designed.uncertainty_note),
            "uncertainty_note": start.designed.uncertainty_note, "safety": start.safety,
            "patient": start.designed.patient}


async def run_chat(runtime: Runtime, start: ChatStart) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """Yield ("meta"|"delta"|"done"|"error", payload). Cancelling the consumer cancels generation."""
    finish = "cancelled"
    status = 499
    usage = {"prompt_tokens": start.handle.prompt_tokens, "completion_tokens": 0}
    first_at: float | None = None
    start.opened = True
    runtime.stream_opened()
    error_code: str | None = None
    try:
        yield "meta", meta_event(start)
        async for event in start.handle:
            if isinstance(event, TokenDelta):
                if first_at is None:
                    first_at = time.perf_counter()
                    runtime.metrics.ttft.observe(first_at - start.started)
                start.text.append(event.text)
                yield "delta", {"text": event.text}
            elif isinstance(event, Finished):
                finish = event.finish_reason
                usage = {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens}
                runtime.metrics.tokens.inc(event.completion_tokens)
                if event.error:
                    start.error = finished_error(event)
                    status, error_code = start.error.status, start.error.code
                    yield "error", error_payload(error_code, start.error.message, start.request_id, status)
                    return
                status = 200
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                yield "done", {"id": start.id, "finish_reason": finish, "usage": usage,
                               "safety": start.safety}
    except (asyncio.CancelledError, GeneratorExit):
        finish, status = "cancelled", 499
        raise
    except EngineError as exc:
        start.error = mapped = to_api_error(exc)
        finish, status, error_code = "error", mapped.status, mapped.code
        yield "error", error_payload(mapped.code, mapped.message, start.request_id, mapped.status)
    finally:
        start.handle.cancel()
        runtime.stream_closed()
        runtime.metrics.finish.labels(finish).inc()
        audit_chat(runtime, start, finish, status, usage, first_at, error_code)


def error_payload(code: str, message: str, request_id: str | None, status: int = 500) -> dict[str, Any]:
    """The SSE `error` event: the one error shape, plus its fields flat for simple clients (the chat page)."""
    error = error_body(status, code, message, request_id)["error"]
    return {"error": error, **error}
