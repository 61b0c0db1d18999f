"""POST /v1/chat/completions and GET /v1/models: OpenAI-compatible, streaming and not.

References and safety ride in an extra `doctorglm` field that standard clients ignore; the safety
notice (and emergency advice) are also part of the message text, so every client shows them.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from sse_starlette import EventSourceResponse

from ..auth import require_api_key
from ..conversation import ChatInput, meta_event, run_chat
from ..engine.types import ChatTurn, SamplingParams
from ..errors import APIError
from ..runtime import Runtime
from ..schemas import (
    CHAT_ERRORS,
    SAMPLING_DEFAULTS,
    SSE_CONTENT,
    ChatCompletionRequest,
    error_responses,
    has_visible_text,
)
from .chat import SSE_PING_S, _start, answer_head, answer_tail, collect, full_answer
from .deps import get_runtime
from .health import live_model

router = APIRouter(prefix="/v1", tags=["openai"])


def to_input(body: ChatCompletionRequest, runtime: Runtime) -> ChatInput:
    """The last user message is the question; earlier user/assistant pairs become history."""
    s = runtime.settings
    turns = [m for m in body.messages if m.role in ("user", "assistant")]
    if not turns or turns[-1].role != "user" or not has_visible_text(turns[-1].text()):
        raise APIError(422, "invalid_request", "messages must end with a non-empty user message")
    history: list[ChatTurn] = []
    pending: str | None = None
    for message in turns[:-1]:
        if message.role == "user":
            if pending is not None:  # two user turns in a row: keep both as one question
                pending += "\n" + message.text()
            else:
                pending = message.text()
        elif pending is not None:
            history.append(ChatTurn(user=pending, assistant=message.text()))
            pending = None
    question = turns[-1].text().strip() if pending is None else f"{pending}\n{turns[-1].text().strip()}"
    max_tokens = body.max_completion_tokens or body.max_tokens or s.default_max_new_tokens
    params = SamplingParams(max_new_tokens=max_tokens, min_new_tokens=body.min_tokens,
                            temperature=SAMPLING_DEFAULTS.temperature if body.temperature is None
                            else body.temperature,
                            top_p=SAMPLING_DEFAULTS.top_p if body.top_p is None else body.top_p, top_k=body.top_k,
                            repetition_penalty=body.repetition_penalty, seed=body.seed, stop=tuple(body.stop_list()))
    return ChatInput(question=question, history=history, params=params, use_knowledge=body.use_knowledge,
                     route="/v1/chat/completions",
                     patient=body.patient.to_context() if body.patient is not None else None)


def _finish(reason: str) -> str:
    return {"stop": "stop", "length": "length"}.get(reason, "stop")


@router.post("/chat/completions", responses={200: {"content": SSE_CONTENT}, **error_responses(*CHAT_ERRORS)},
             summary="OpenAI-compatible chat completion (stream=true for SSE chunks ending with [DONE])")
async def chat_completions(body: ChatCompletionRequest, request: Request, runtime: Runtime = Depends(get_runtime),
                           key: str = Depends(require_api_key)) -> Any:
    start = await _start(runtime, to_input(body, runtime), request, key)
    model = body.model or runtime.settings.served_model_name
    created = int(time.time())
    completion_id = "chatcmpl-" + start.id.removeprefix("chat-")
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventSourceResponse(_stream(runtime, start, model, created, completion_id, include_usage),
                                   ping=SSE_PING_S,
                                   headers={"X-Accel-Buffering": "no"})
    text, done = await collect(runtime, start, request)
    return {
        "id": completion_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": full_answer(start, text)},
                     "finish_reason": _finish(done["finish_reason"]), "logprobs": None}],
        "usage": done["usage"],
        "doctorglm": {**meta_event(start), "finish_reason": done["finish_reason"]},
    }


async def _stream(runtime: Runtime, start: Any, model: str, created: int, cid: str,
                  include_usage: bool) -> AsyncIterator[dict[str, str]]:
    """Chunks as OpenAI sends them; an error is an `error` event ({"error": {...}}); always ends with [DONE]."""

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, str]:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
        return {"data": json.dumps(body, ensure_ascii=False)}

    async for name, payload in run_chat(runtime, start):
        if name == "meta":
            yield chunk({"role": "assistant", "content": ""}, doctorglm=payload)
            if head := answer_head(start):
                yield chunk({"content": head + "\n\n"})
        elif name == "delta":
            yield chunk({"content": payload["text"]})
        elif name == "done":
            if tail := answer_tail(start):
                yield chunk({"content": "\n\n" + tail})
            yield chunk({}, _finish(payload["finish_reason"]), doctorglm={"finish_reason": payload["finish_reason"]})
            if include_usage:
                yield {"data": json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                                           "model": model, "choices": [], "usage": payload["usage"]})}
        elif name == "error":
            yield {"event": "error", "data": json.dumps({"error": payload["error"]}, ensure_ascii=False)}
            break
    yield {"data": "[DONE]"}


@router.get("/models", responses=error_responses(401, 503))
async def list_models(runtime: Runtime = Depends(get_runtime), key: str = Depends(require_api_key)) -> Any:
    return {"object": "list", "data": [{"id": runtime.settings.served_model_name, "object": "model",
                                        "created": int(runtime.started_at), "owned_by": "doctorglm",
                                        "doctorglm": live_model(runtime)}]}
