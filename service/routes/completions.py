"""POST /v1/completions: OpenAI's legacy completions, as vLLM serves them, for evaluation tools.

Raw completion: the prompt goes to the model as it is (text or token ids) — no chat template, no disease
brief, no safety text. `logprobs` gives each generated token's log-probability with the top alternatives;
`echo` returns the prompt with its own log-probabilities (what lm-evaluation-harness scores multiple-choice
exams with). Keyed like every other generation endpoint.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator
from sse_starlette import EventSourceResponse

from ..auth import require_api_key
from ..chat_checks import check_max_tokens
from ..engine.contract import EngineStream
from ..engine.types import (
    EngineError,
    Finished,
    GenerationRequest,
    PromptLogprobs,
    PromptTooLong,
    SamplingParams,
    TokenDelta,
    TokenLogprob,
)
from ..errors import APIError, error_body, finished_error, to_api_error
from ..runtime import Runtime
from ..schemas import (
    CHAT_ERRORS,
    HARD_MAX_CHARS,
    HARD_MAX_TOKENS,
    MAX_STOP,
    SAMPLING_DEFAULTS,
    SSE_CONTENT,
    Bool,
    Float,
    Int,
    StopString,
    error_responses,
    seed_field,
    temperature_field,
    top_p_field,
)
from .chat import SSE_PING_S
from .deps import get_runtime, request_id, unless_disconnected

router = APIRouter(prefix="/v1", tags=["openai"])

MAX_PROMPTS = 16  # prompts in one request (each becomes one choice)
MAX_LOGPROBS = 20  # OpenAI's ceiling for the legacy endpoint
PromptText = Annotated[str, StringConstraints(min_length=1, max_length=HARD_MAX_CHARS)]
TokenIds = Annotated[list[Int], Field(min_length=1, max_length=HARD_MAX_TOKENS)]


class CompletionRequest(BaseModel):
    """The legacy completions body; fields standard clients send but we do not use are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, max_length=256)
    prompt: (PromptText | TokenIds | Annotated[list[PromptText], Field(min_length=1, max_length=MAX_PROMPTS)]
             | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)])
    max_tokens: Int | None = Field(16, ge=0, le=HARD_MAX_TOKENS, description="OpenAI's default is 16")
    temperature: Float | None = temperature_field
    top_p: Float | None = top_p_field
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    n: Int | None = Field(1, description="only 1 is supported")
    logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="top alternatives per token")
    echo: Bool | None = False
    seed: Int | None = seed_field
    stream: Bool | None = False
    stream_options: dict[str, Any] | None = None
    user: str | None = Field(None, max_length=256)
    min_tokens: Int = Field(0, ge=0, le=HARD_MAX_TOKENS, description="vLLM's extension: no end-of-text before this")

    @model_validator(mode="after")
    def _checks(self) -> CompletionRequest:
        if self.n not in (None, 1):
            raise ValueError("n: only 1 completion per prompt is supported")
        if self.min_tokens > (self.max_tokens if self.max_tokens is not None else 16):
            raise ValueError("min_tokens must not exceed max_tokens")
        if (self.max_tokens or 0) == 0 and not self.echo:
            raise ValueError("max_tokens: 0 is allowed only with echo (the prompt's log-probabilities)")
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]

    def params(self) -> SamplingParams:
        stop = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return SamplingParams(
            max_new_tokens=self.max_tokens if self.max_tokens is not None else 16,
            temperature=SAMPLING_DEFAULTS.temperature if self.temperature is None else self.temperature,
            top_p=SAMPLING_DEFAULTS.top_p if self.top_p is None else self.top_p,
            min_new_tokens=self.min_tokens, repetition_penalty=1.0, seed=self.seed, stop=stop, logprobs=self.logprobs,
            prompt_logprobs=bool(self.echo))


@dataclass
class Choice:
    """What one prompt's stream has produced so far."""

    index: int
    handle: EngineStream
    prompt: str | list[int]
    text: str = ""
    tokens: list[TokenLogprob] = field(default_factory=list)
    finished: Finished | None = None


def logprobs_body(tokens: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """OpenAI's legacy logprobs object: parallel lists of tokens, their log-probabilities, top alternatives
    and character offsets into the choice's text."""
    offsets, position = [], offset
    for token in tokens:
        offsets.append(position)
        position += len(token.text)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [({text: lp for _, text, lp in t.top} if t.logprob is not None else None)
                             for t in tokens],
            "text_offset": offsets}


def finish_reason(done: Finished) -> str:
    return "length" if done.finish_reason == "length" else "stop"


async def submit_all(runtime: Runtime, body: CompletionRequest, rid: str) -> list[Choice]:
    engine = runtime.engine
    if engine is None or not runtime.ready:
        raise APIError(503, "not_ready", "the model is not loaded yet", {"Retry-After": "5"})
    params = body.params()
    check_max_tokens(runtime.settings, params)
    choices: list[Choice] = []
    try:
        for index, prompt in enumerate(body.prompts()):
            request = GenerationRequest(message=prompt if isinstance(prompt, str) else "", raw=True,
                                        raw_ids=None if isinstance(prompt, str) else list(prompt),
                                        params=params, request_id=rid)
            handle = engine.submit(request, engine.prepare(request))
            choices.append(Choice(index, handle, prompt))
            await handle.open()
    except BaseException as exc:
        # A later prompt refused (PromptTooLong is a ValueError, not an EngineError) or a client gone:
        # the prompts already queued must not generate for nobody.
        for choice in choices:
            choice.handle.cancel()
        if isinstance(exc, EngineError | PromptTooLong):
            raise to_api_error(exc, runtime.retry_after_s()) from exc
        raise
    return choices


def echo_text(choice: Choice, event: PromptLogprobs) -> str:
    if isinstance(choice.prompt, str):
        return choice.prompt
    return "".join(t.text for t in event.tokens)


@router.post("/completions", responses={200: {"content": SSE_CONTENT}, **error_responses(*CHAT_ERRORS)},
             summary="OpenAI legacy completion: raw prompt (text or token ids), logprobs, echo; no brief, "
                     "no safety text")
async def completions(body: CompletionRequest, request: Request, runtime: Runtime = Depends(get_runtime),
                      key: str = Depends(require_api_key)) -> Any:
    rid = request_id(request)
    choices = await submit_all(runtime, body, rid)
    model = body.model or runtime.settings.served_model_name
    cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if body.stream:
        usage = bool((body.stream_options or {}).get("include_usage"))
        return EventSourceResponse(_stream(runtime, choices, body, model, cid, created, usage, rid), ping=SSE_PING_S,
                                   headers={"X-Accel-Buffering": "no"})
    runtime.stream_opened()
    try:
        await unless_disconnected(asyncio.gather(*(_collect(c) for c in choices)), request)
    finally:
        runtime.stream_closed()
        for choice in choices:
            choice.handle.cancel()  # a client that went away (or a failed sibling) frees the rows
    return {"id": cid, "object": "text_completion", "created": created, "model": model,
            "choices": [_choice_body(c, body) for c in choices], "usage": _usage(choices)}


async def _collect(choice: Choice) -> None:
    async for event in choice.handle:
        if isinstance(event, PromptLogprobs):
            choice.text += echo_text(choice, event)
            choice.tokens.extend(event.tokens)
        elif isinstance(event, TokenDelta):
            choice.text += event.text
            choice.tokens.extend(event.logprobs)
        else:
            choice.finished = event
    done = choice.finished
    if done is None or done.finish_reason in ("error", "cancelled"):
        raise finished_error(done)


def _choice_body(choice: Choice, body: CompletionRequest) -> dict[str, Any]:
    logprobs = (logprobs_body(choice.tokens, 0) if body.logprobs is not None
                else None)
    return {"index": choice.index, "text": choice.text, "logprobs": logprobs,
            "finish_reason": finish_reason(choice.finished) if choice.finished else None}


def _usage(choices: list[Choice]) -> dict[str, int]:
    prompt = sum(c.finished.prompt_tokens for c in choices if c.finished)
    completion = sum(c.finished.completion_tokens for c in choices if c.finished)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _stream(runtime: Runtime, choices: list[Choice], body: CompletionRequest, model: str, cid: str,
                  created: int, include_usage: bool, rid: str) -> AsyncIterator[dict[str, str]]:
    """One chunk per event of any choice, as OpenAI sends them; an error is an `error` event; ends with [DONE]."""
    queue: asyncio.Queue[tuple[Choice, Any]] = asyncio.Queue()

    async def pump(choice: Choice) -> None:
        try:
            async for event in choice.handle:
                await queue.put((choice, event))
        except Exception as exc:  # noqa: BLE001 - reported to the client as an error event
            await queue.put((choice, exc))

    def chunk(choice: Choice, text: str, tokens: tuple[TokenLogprob, ...], finish: str | None) -> dict[str, str]:
        offset = len(choice.text)
        choice.text += text
        logprobs = logprobs_body(list(tokens), offset) if body.logprobs is not None else None
        data = {"id": cid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}
        return {"data": json.dumps(data, ensure_ascii=False)}

    runtime.stream_opened()
    tasks = [asyncio.ensure_future(pump(c)) for c in choices]
    try:
        open_choices = len(choices)
        while open_choices:
            choice, event = await queue.get()
            if isinstance(event, PromptLogprobs):
                yield chunk(choice, echo_text(choice, event), event.tokens, None)
            elif isinstance(event, TokenDelta):
                yield chunk(choice, event.text, event.logprobs, None)
            elif isinstance(event, Finished) and event.finish_reason not in ("error", "cancelled"):
                choice.finished = event
                open_choices -= 1
                yield chunk(choice, "", (), finish_reason(event))
            else:
                error = to_api_error(event) if isinstance(event, Exception) else finished_error(event)
                yield {"event": "error", "data": json.dumps(error_body(error.status, error.code, error.message, rid))}
                break
        else:
            if include_usage:
                yield {"data": json.dumps({"id": cid, "object": "text_completion", "created": created,
                                           "model": model, "choices": [], "usage": _usage(choices)})}
        yield {"data": "[DONE]"}
    finally:
        runtime.stream_closed()
        for task in tasks:
            task.cancel()
        for choice in choices:
            choice.handle.cancel()
