"""Audit records: one per API request — accepted chats (audit_chat, once, however they end) and every
other request, refused or not a chat (audit_request, the middleware's hook)."""

from __future__ import annotations

import datetime as dt
import logging
import time
from typing import Any

from .chat_turn import ChatStart
from .runtime import Runtime

log = logging.getLogger("service.conversation")


def _iso(timestamp: float | None = None) -> str:
    moment = dt.datetime.fromtimestamp(timestamp, dt.UTC) if timestamp is not None else dt.datetime.now(dt.UTC)
    return moment.isoformat(timespec="milliseconds")


def audit_chat(runtime: Runtime, start: ChatStart, finish: str, status: int, usage: dict[str, int],
               first_at: float | None, error_code: str | None = None) -> None:
    """The audit record of an accepted chat (written once, whatever way it ended)."""
    if start.audited:
        return
    start.audited = True
    now = time.perf_counter()
    record: dict[str, Any] = {
        "time": _iso(),
        "received_at": _iso(start.received_at),
        "request_id": start.request_id,
        "id": start.id,
        "key_id": start.key_id,
        "route": start.input.route,
        "status": status,
        "finish_reason": finish,
        "latency_ms": round((now - start.started) * 1000, 1),
        "ttft_ms": round((first_at - start.started) * 1000, 1) if first_at else None,
        "prompt_tokens": usage.get("prompt_tokens", 0),
        "completion_tokens": usage.get("completion_tokens", 0),
        "references": [{"id": r["id"], "name": r["name"], "score": r["score"]} for r in start.designed.references],
        "safety_level": start.safety["level"],
        "safety_rules": start.safety["rules"],
        "error": error_code,
    }
    if runtime.settings.audit_text:
        record["question"] = start.input.question
        record["answer"] = "".join(start.text)
    runtime.audit.write(record)
    if status == 200:  # the time a row was busy: from its first token, not counting the wait in the queue
        runtime.record_service_time(now - (first_at or start.started))
    log.info("chat finished", extra={"finish_reason": finish, "status": status,
                                     "completion_tokens": usage.get("completion_tokens", 0)})


def audit_request(runtime: Runtime, state: dict[str, Any], route: str, status: int, elapsed_s: float) -> None:
    """Middleware hook, once per API request: accepted chats are audited by run_chat; every other
    request (rejected, failed, or not a chat) gets its record here."""
    start: ChatStart | None = state.get("chat")
    if start is not None:
        if not start.opened and not start.audited:  # accepted, but the response never started
            start.handle.cancel()
            audit_chat(runtime, start, "cancelled", status if status != 200 else 499,
                       {"prompt_tokens": start.handle.prompt_tokens, "completion_tokens": 0}, None)
        return
    now = time.time()
    record: dict[str, Any] = {
        "time": _iso(now), "received_at": _iso(now - elapsed_s), "request_id": state.get("request_id"),
        "key_id": state.get("key_id"), "route": route, "status": status,
        "latency_ms": round(elapsed_s * 1000, 1), "error": state.get("error_code"), "finish_reason": None,
    }
    if runtime.settings.audit_text and state.get("audit_query"):
        record["question"] = state["audit_query"]
    runtime.audit.write(record)
