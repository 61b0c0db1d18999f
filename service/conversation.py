"""One chat turn, shared by /chat, /chat/stream and /v1/chat/completions: the orchestration.

start_chat checks, triages, designs the prompt and queues the request (every caller mistake becomes an
APIError before any byte is streamed). The parts it uses, one job each: chat_turn (the data), chat_checks
(limits that depend on the settings), chat_events (run_chat: engine events to meta / delta / done / error)
and chat_audit (the audit records).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
import uuid

from llm.designer import triage_facts

from .chat_checks import check_limits, strip_notice
from .chat_events import meta_event, run_chat
from .chat_turn import ChatInput, ChatStart
from .engine.types import ChatTurn, EngineError, GenerationRequest
from .errors import APIError, to_api_error
from .runtime import Runtime

# What the routes import from here; the audit hook and the SSE error shape come from their own modules.
__all__ = ["ChatInput", "ChatStart", "clock", "meta_event", "run_chat", "start_chat"]


async def start_chat(runtime: Runtime, chat: ChatInput, request_id: str, key_id: str) -> ChatStart:
    if runtime.draining:
        raise APIError(503, "draining", "the server is shutting down; retry on another instance", {"Retry-After": "5"})
    if not runtime.ready:
        raise APIError(503, "not_ready", "the service is starting; retry shortly", {"Retry-After": "5"})
    check_limits(runtime.settings, chat)
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
                                request_id=request_id, shared_prefix=designed.shared_prefix)
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


def clock() -> str:
    """ChatGLM api.py's `time` field format."""
    return dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
