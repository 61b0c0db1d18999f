"""POST /chat (ChatGLM-6B api.py compatible, extended) and POST /chat/stream (SSE)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from sse_starlette import EventSourceResponse

from ..auth import require_api_key
from ..conversation import ChatInput, ChatStart, clock, run_chat, start_chat
from ..engine.types import ChatTurn, SamplingParams
from ..runtime import Runtime
from ..schemas import CHAT_ERRORS, SSE_CONTENT, ChatRequest, ChatResponse, error_responses
from .deps import get_runtime, request_id, unless_disconnected

router = APIRouter(tags=["chat"])
SSE_PING_S = 5


def to_input(body: ChatRequest, runtime: Runtime, route: str) -> ChatInput:
    s = runtime.settings
    params = SamplingParams(
        max_new_tokens=body.max_new_tokens or s.default_max_new_tokens,
        min_new_tokens=body.min_new_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        repetition_penalty=body.repetition_penalty,
        seed=body.seed,
        stop=tuple(body.stop),
    )
    history = [ChatTurn(user=q, assistant=a) for q, a in body.history or []]
    return ChatInput(question=body.prompt.strip(), history=history, params=params,
                     use_knowledge=body.use_knowledge, max_length=body.max_length, route=route,
                     patient=body.patient.to_context() if body.patient is not None else None)


async def _start(runtime: Runtime, chat: ChatInput, request: Request, key: str) -> ChatStart:
    """Start a chat; the request's state keeps it so the audit hook knows the request was accepted."""
    start = await start_chat(runtime, chat, request_id(request), key)
    request.state.chat = start
    return start


def sse_response(events: AsyncIterator[tuple[str, dict[str, Any]]]) -> EventSourceResponse:
    async def encode() -> AsyncIterator[dict[str, str]]:
        async for name, payload in events:
            yield {"event": name, "data": json.dumps(payload, ensure_ascii=False)}

    return EventSourceResponse(encode(), ping=SSE_PING_S, headers={"X-Accel-Buffering": "no"})


def answer_head(start: ChatStart) -> str:
    """Text shown before the model's answer: the emergency advice, if any."""
    return start.safety.get("advice") or ""


def answer_tail(start: ChatStart) -> str:
    """Text shown after the model's answer: the uncertainty note when retrieval could not single out a
    disease, then the safety notice."""
    return "\n\n".join(p for p in (start.designed.uncertainty_note, start.safety.get("notice")) if p)


def full_answer(start: ChatStart, text: str) -> str:
    """What an api.py client shows: head, the model's answer, tail."""
    return "\n\n".join(p for p in (answer_head(start), text.strip(), answer_tail(start)) if p)


async def collect(runtime: Runtime, start: ChatStart, request: Request) -> tuple[str, dict[str, Any]]:
    """Run a chat to the end; returns (text, done payload) or raises APIError on an error event.
    A client that leaves cancels it (run_chat's cleanup frees the engine row)."""

    async def consume() -> tuple[str, dict[str, Any]]:
        done: dict[str, Any] = {}
        async for name, payload in run_chat(runtime, start):
            if name == "error":  # the status run_chat mapped (503 + Retry-After upstream or draining, 500 failed)
                assert start.error is not None
                raise start.error
            if name == "done":
                done = payload
        return "".join(start.text), done

    return await unless_disconnected(consume(), request)


@router.post("/chat", response_model=ChatResponse,
             responses={200: {"content": SSE_CONTENT}, **error_responses(*CHAT_ERRORS)},
             summary="Answer a patient's question (ChatGLM-6B api.py compatible; stream=true for SSE)")
async def chat(body: ChatRequest, request: Request, runtime: Runtime = Depends(get_runtime),
               key: str = Depends(require_api_key)) -> Any:
    chat_input = to_input(body, runtime, "/chat")
    start = await _start(runtime, chat_input, request, key)
    if body.stream:
        return sse_response(run_chat(runtime, start))
    text, done = await collect(runtime, start, request)
    answer = full_answer(start, text)
    history = [*(body.history or []), (body.prompt, answer)]
    return ChatResponse(
        response=answer, history=history, status=200, time=clock(), id=start.id,
        references=start.designed.references, keywords=start.designed.keywords, usage=done["usage"],
        finish_reason=done["finish_reason"], safety=start.safety, uncertain=bool(start.designed.uncertainty_note),
        patient=start.designed.patient,
    )


@router.post("/chat/stream", response_class=EventSourceResponse,
             responses={200: {"content": SSE_CONTENT}, **error_responses(*CHAT_ERRORS)},
             summary="Stream an answer as server-sent events: meta, delta..., done (or error)")
async def chat_stream(body: ChatRequest, request: Request, runtime: Runtime = Depends(get_runtime),
                      key: str = Depends(require_api_key)) -> EventSourceResponse:
    start = await _start(runtime, to_input(body, runtime, "/chat/stream"), request, key)
    return sse_response(run_chat(runtime, start))
