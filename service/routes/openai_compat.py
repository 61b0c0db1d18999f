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
from ..schemas import ChatCompletionRequest
from .chat import SSE_PING_S, _start, collect, full_answer
from .deps import get_runtime, request_id

router = APIRouter(prefix="/v1", tags=["openai"])


def to_input(body: ChatCompletionRequest, runtime: Runtime) -> ChatInput:
    """The last user message is the question; earlier user/assistant pairs become history."""
    s = runtime.settings
    turns = [m for m in body.messages if m.role in ("user", "assistant")]
    if not turns or turns[-1].role != "user" or not turns[-1].text().strip():
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
                            temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                            repetition_penalty=body.repetition_penalty, seed=body.seed, stop=tuple(body.stop_list()))
    return ChatInput(question=question, history=history, params=params, use_knowledge=body.use_knowledge,
                     route="/v1/chat/completions")


def _finish(reason: str) -> str:
    return {"stop": "stop", "length": "length"}.get(reason, "stop")


@router.post("/chat/completions", responses={401: {}, 413: {}, 422: {}, 429: {}, 503: {}})
async def chat_completions(body: ChatCompletionRequest, request: Request, runtime: Runtime = Depends(get_runtime),
                           key: str = Depends(require_api_key)) -> Any:
    start = await _start(runtime, to_input(body, runtime), request_id(request), key)
    model = body.model or runtime.settings.served_model_name
    created = int(time.time())
    completion_id = "chatcmpl-" + start.id.removeprefix("chat-")
    if body.stream:
        return EventSourceResponse(_stream(runtime, start, model, created, completion_id), ping=SSE_PING_S,
                                   headers={"X-Accel-Buffering": "no"})
    text, done = await collect(runtime, start)
    return {
        "id": completion_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": full_answer(start, text)},
                     "finish_reason": _finish(done["finish_reason"]), "logprobs": None}],
        "usage": done["usage"],
        "doctorglm": {**meta_event(start), "finish_reason": done["finish_reason"]},
    }


async def _stream(runtime: Runtime, start: Any, model: str, created: int, cid: str) -> AsyncIterator[str]:
    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
        return json.dumps(body, ensure_ascii=False)

    async for name, payload in run_chat(runtime, start):
        if name == "meta":
            yield chunk({"role": "assistant", "content": ""}, doctorglm=payload)
            if start.safety.get("advice"):
                yield chunk({"content": start.safety["advice"] + "\n\n"})
        elif name == "delta":
            yield chunk({"content": payload["text"]})
        elif name == "done":
            notice = start.safety.get("notice")
            if notice:
                yield chunk({"content": "\n\n" + notice})
            yield chunk({}, _finish(payload["finish_reason"]), usage=payload["usage"],
                        doctorglm={"finish_reason": payload["finish_reason"]})
        elif name == "error":
            yield json.dumps({"error": payload}, ensure_ascii=False)
            return
    yield "[DONE]"


@router.get("/models")
async def list_models(runtime: Runtime = Depends(get_runtime), key: str = Depends(require_api_key)) -> Any:
    return {"object": "list", "data": [{"id": runtime.settings.served_model_name, "object": "model",
                                        "created": int(runtime.started_at), "owned_by": "doctorglm"}]}
