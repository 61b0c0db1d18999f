"""One chat turn, shared by /chat, /chat/stream and /v1/chat/completions.

start_chat validates, triages, designs the prompt and queues the request (every caller mistake
becomes an APIError before any byte is streamed); run_chat turns the engine's events into
meta / delta / done / error events and records metrics and the audit record, whatever happens.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from knowledge.patient import PatientContext
from llm.designer import NO_MATCH_NOTE, UNCERTAIN_NOTE, DesignedPrompt, triage_facts

from .engine.contract import EngineStream
from .engine.types import ChatTurn, EngineError, Finished, GenerationRequest, SamplingParams, TokenDelta
from .errors import APIError, error_body, to_api_error
from .runtime import Runtime

log = logging.getLogger(__name__)


@dataclass
class ChatInput:
    """A chat turn as every endpoint normalises it."""

    question: str
    history: list[ChatTurn]
    params: SamplingParams
    use_knowledge: bool = True
    max_length: int | None = None
    route: str = "/chat"
    patient: PatientContext | None = None  # structured facts from the patient's record


@dataclass
class ChatStart:
    id: str
    request_id: str
    key_id: str
    input: ChatInput
    designed: DesignedPrompt
    safety: dict[str, Any]
    handle: EngineStream
    started: float
    received_at: float = field(default_factory=time.time)
    text: list[str] = field(default_factory=list)
    opened: bool = False  # run_chat began: it owns the audit record from then on
    audited: bool = False


def strip_notice(answer: str, notice: str) -> str:
    """Answers we sent carry the safety notice; drop it when the client sends them back as history."""
    answer = answer.rstrip()
    for tail in (notice, *UNCERTAIN_NOTE.values(), *NO_MATCH_NOTE.values()):
        if tail and answer.endswith(tail):
            answer = answer[: -len(tail)].rstrip()
    return answer


def _check_limits(runtime: Runtime, chat: ChatInput) -> None:
    s = runtime.settings
    if len(chat.question) > s.max_input_chars:
        raise APIError(422, "input_too_long",
                       f"the question is {len(chat.question)} characters; the limit is {s.max_input_chars}")
    if len(chat.history) > s.max_history_turns:
        raise APIError(422, "history_too_long",
                       f"history has {len(chat.history)} turns; the limit is {s.max_history_turns}")
    total = sum(len(t.user) + len(t.assistant) for t in chat.history)
    if total > 8 * s.max_input_chars:
        raise APIError(422, "history_too_long", f"history has {total} characters; shorten it")
    if chat.params.max_new_tokens > s.max_new_tokens:
        raise APIError(422, "invalid_request",
                       f"max_new_tokens {chat.params.max_new_tokens} is over the limit of {s.max_new_tokens}")
    if chat.params.min_new_tokens > chat.params.max_new_tokens:
        raise APIError(422, "invalid_request", f"min_new_tokens {chat.params.min_new_tokens} must not exceed "
                                               f"max_new_tokens {chat.params.max_new_tokens}")


async def start_chat(runtime: Runtime, chat: ChatInput, request_id: str, key_id: str) -> ChatStart:
    if runtime.draining:
        raise APIError(503, "draining", "the server is shutting down; retry on another instance", {"Retry-After": "5"})
    if not runtime.ready:
        raise APIError(503, "not_ready", "the service is starting; retry shortly", {"Retry-After": "5"})
    _check_limits(runtime, chat)
    notice = runtime.settings.safety_notice
    chat.history = [ChatTurn(t.user, strip_notice(t.assistant, notice)) for t in chat.history]
    assessment = runtime.triage.assess(chat.question, [t.user for t in chat.history], **triage_facts(chat.patient))
    assert runtime.designer is not None
    designed = runtime.designer.design(chat.question, chat.history, use_knowledge=chat.use_knowledge,
                                       urgent_note=assessment.prompt_note, suspects=assessment.suspects,
                                       patient=chat.patient)
    runtime.metrics.retrieval.observe(designed.retrieval_ms / 1000)
    if assessment.level == "emergency":
        runtime.metrics.emergencies.inc()
    request = GenerationRequest(message=designed.message, history=chat.history, params=chat.params,
                                request_id=request_id)
    try:
        prompt_ids = runtime.engine.prepare(request)
        if chat.max_length is not None and prompt_ids is not None:
            room = chat.max_length - len(prompt_ids)
            if room < 1:
                raise APIError(422, "prompt_too_long",
                               f"the prompt is {len(prompt_ids)} tokens, not under max_length {chat.max_length}")
            if room < request.params.max_new_tokens:
                request.params = dataclasses.replace(request.params, max_new_tokens=room)
        handle = runtime.engine.submit(request, prompt_ids)
        await handle.open()  # engines that connect elsewhere fail here, before any byte is streamed
    except EngineError as exc:
        raise to_api_error(exc, runtime.retry_after_s()) from exc
    safety = {**assessment.to_dict(), "notice": notice}
    return ChatStart(id=f"chat-{uuid.uuid4().hex[:24]}", request_id=request_id, key_id=key_id, input=chat,
                     designed=designed, safety=safety, handle=handle, started=time.perf_counter())


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
                    status = 500 if finish == "error" else 503
                    error_code = "generation_failed" if finish == "error" else "shutting_down"
                    yield "error", error_payload(error_code, event.error, start.request_id, status)
                    return
                status = 200
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                yield "done", {"id": start.id, "finish_reason": finish, "usage": usage,
                               "safety": start.safety}
    except (asyncio.CancelledError, GeneratorExit):
        finish, status = "cancelled", 499
        raise
    except EngineError as exc:
        mapped = to_api_error(exc)
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
    if status == 200:
        runtime.record_service_time(now - start.started)
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


def clock() -> str:
    """ChatGLM api.py's `time` field format."""
    return dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
