"""The upstream engine: forwards generation to an OpenAI-compatible server (vLLM, TGI, another instance).

Prompt design, auth, references, safety and audit stay in this service; only the model's work moves.
The interface matches LocalEngine: submit() checks the bounded in-flight count synchronously and
returns a handle; `await handle.open()` connects and checks the upstream's status before the API
answers, so a dead upstream is a 503 `upstream_unavailable` at once, never a stream that hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

import httpx

from .types import (
    EngineNotReady,
    Finished,
    GenerationRequest,
    NotSupported,
    PromptTooLong,
    QueueFull,
    TokenDelta,
    UpstreamError,
)

log = logging.getLogger(__name__)
Event = TokenDelta | Finished

CONNECT_TIMEOUT_S = 5.0
# Time allowed until the upstream's response headers: OpenAI-compatible servers answer a streaming
# request at once (the tokens follow), so a long wait here means the upstream is stuck.
OPEN_TIMEOUT_S = 30.0
_TOO_LONG_HINTS = ("context length", "maximum context", "too long", "prompt_too_long", "input_too_long")


def build_messages(request: GenerationRequest) -> list[dict[str, str]]:
    """History turns, then the designed message (disease brief + question) as the last user turn."""
    messages: list[dict[str, str]] = []
    for turn in request.history:
        messages.append({"role": "user", "content": turn.user})
        messages.append({"role": "assistant", "content": turn.assistant})
    messages.append({"role": "user", "content": request.message})
    return messages


def build_body(request: GenerationRequest, model: str | None) -> dict[str, Any]:
    """The chat-completions body. Extensions are sent only when they differ from the neutral value."""
    p = request.params
    body: dict[str, Any] = {
        "messages": build_messages(request),
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": p.max_new_tokens,
        "temperature": p.temperature,
        "top_p": p.top_p,
        # This service as the upstream: the prompt was designed here; do not design it again there.
        # vLLM and TGI ignore the unknown field.
        "use_knowledge": False,
    }
    if model:
        body["model"] = model
    if p.stop:
        body["stop"] = list(p.stop)
    if p.seed is not None:
        body["seed"] = p.seed
    if p.top_k > 0:
        body["top_k"] = p.top_k
    if p.repetition_penalty != 1.0:
        body["repetition_penalty"] = p.repetition_penalty
    if p.min_new_tokens > 0:
        body["min_tokens"] = p.min_new_tokens
    return body


class UpstreamHandle:
    """One forwarded request: `await open()`, then iterate TokenDelta... Finished; cancel() closes it."""

    def __init__(self, engine: UpstreamEngine, request: GenerationRequest) -> None:
        self._engine = engine
        self._request = request
        self.prompt_tokens = 0  # unknown until the upstream reports usage
        self._response: httpx.Response | None = None
        self._opened = False
        self._released = False
        self._closed = False
        self._abort_message: str | None = None
        # DoctorGLM upstreams add their own advice and notice text; this service adds them itself.
        self._strip: set[str] = set()

    # ----- life cycle -----

    async def open(self) -> None:
        """Connect and check the status; raises UpstreamError (or PromptTooLong) and frees the slot."""
        if self._opened:
            return
        self._opened = True
        try:
            self._response = await self._engine._send(self._request)
        except BaseException:
            self._release()
            raise
        if self._released:  # cancelled while connecting: close the stream nobody may read
            await self._close()

    def cancel(self) -> None:
        """Stop generation: close the upstream stream (the upstream then stops its work) and free the slot."""
        self._release()
        self._schedule_close()

    def _abort(self, message: str) -> None:
        self._abort_message = message
        self.cancel()

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self._engine._release(self)

    def _schedule_close(self) -> None:
        if self._response is None or self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(self._close())
        self._engine._tasks.add(task)
        task.add_done_callback(self._engine._tasks.discard)

    async def _close(self) -> None:
        if self._response is not None and not self._closed:
            self._closed = True
            with contextlib.suppress(Exception):
                await self._response.aclose()

    # ----- events -----

    async def __aiter__(self) -> AsyncIterator[Event]:
        if not self._opened:
            await self.open()
        assert self._response is not None
        completion_tokens = 0
        prompt_tokens = 0
        usage_seen = False
        finish: str | None = None
        try:
            try:
                async for line in self._response.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # event names, comments (pings) and blank separators
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    try:
                        chunk = json.loads(data)
                    except json.JSONDecodeError as exc:
                        raise UpstreamError(f"the upstream sent a malformed chunk: {data[:120]!r}") from exc
                    if not isinstance(chunk, dict):
                        continue
                    if chunk.get("error"):
                        error = chunk["error"]
                        message = error.get("message", error) if isinstance(error, dict) else error
                        raise UpstreamError(f"the upstream failed during generation: {message}")
                    self._note_doctorglm(chunk.get("doctorglm"))
                    usage = chunk.get("usage")
                    if isinstance(usage, dict):
                        usage_seen = True
                        prompt_tokens = int(usage.get("prompt_tokens") or 0)
                        completion_tokens = int(usage.get("completion_tokens") or 0)
                    for choice in chunk.get("choices") or []:
                        if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                            continue
                        text = (choice.get("delta") or {}).get("content")
                        if text and text not in self._strip:
                            yield TokenDelta(text)
                        if choice.get("finish_reason"):
                            finish = str(choice["finish_reason"])
                    extra = chunk.get("doctorglm")
                    if finish and isinstance(extra, dict) and extra.get("finish_reason"):
                        finish = str(extra["finish_reason"])  # its own reason (repetition, ...) when given
            except UpstreamError:
                raise
            except (httpx.HTTPError, OSError, RuntimeError) as exc:
                if self._abort_message is not None:
                    yield Finished("cancelled", prompt_tokens, completion_tokens, error=self._abort_message)
                    return
                raise UpstreamError(f"the upstream connection broke: {type(exc).__name__}: {exc}") from exc
            if self._abort_message is not None:
                yield Finished("cancelled", prompt_tokens, completion_tokens, error=self._abort_message)
                return
            if finish is None:
                raise UpstreamError("the upstream stream ended without a finish_reason")
            if not usage_seen:
                log.debug("the upstream reported no usage: token counts are recorded as 0")
            self.prompt_tokens = prompt_tokens
            yield Finished(finish, prompt_tokens, completion_tokens)
        finally:
            self._release()
            await self._close()

    def _note_doctorglm(self, extra: Any) -> None:
        """An instance of this service as the upstream: drop the advice and notice chunks it adds."""
        if not isinstance(extra, dict) or not isinstance(extra.get("safety"), dict):
            return
        safety = extra["safety"]
        if safety.get("advice"):
            self._strip.add(str(safety["advice"]) + "\n\n")
        if safety.get("notice"):
            self._strip.add("\n\n" + str(safety["notice"]))


class UpstreamEngine:
    """The Engine contract (contract.py), backed by `{upstream_url}/chat/completions` (stream=true)."""

    kind = "openai"

    def __init__(self, settings: Any) -> None:
        if not settings.upstream_url:
            raise ValueError("DOCTORGLM_UPSTREAM_URL is required for DOCTORGLM_ENGINE=openai")
        self.base_url = str(settings.upstream_url).rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.model = settings.upstream_model or None
        self.model_name = f"upstream:{self.model or self.base_url}"
        key = settings.upstream_api_key
        self.api_key = key.get_secret_value() if key is not None else None
        self.timeout_s = float(settings.upstream_timeout_s)
        self.max_in_flight = int(settings.max_queue) + int(settings.max_batch_size)
        self.max_connections = int(settings.max_batch_size) * 2
        self.ready = False
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._handles: set[UpstreamHandle] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    # ----- public API -----

    def start(self) -> None:
        self.ready = True
        log.info("forwarding generation to %s", self.url)

    def stop(self, timeout: float = 5.0) -> None:
        self.ready = False
        client, loop, self._client = self._client, self._loop, None
        if client is None or loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            task = loop.create_task(client.aclose())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif loop.is_running():
            future = asyncio.run_coroutine_threadsafe(client.aclose(), loop)
            with contextlib.suppress(Exception):
                future.result(timeout)

    def abort_all(self, message: str) -> None:
        """End every forwarded request with an error event (the end of a drain); safe from any thread."""
        with self._lock:
            handles = list(self._handles)
        loop = self._loop
        for handle in handles:
            if loop is not None and loop.is_running():
                loop.call_soon_threadsafe(handle._abort, message)

    def stats(self) -> dict[str, int]:
        with self._lock:
            # Derived, not counted: a handle cancelled while it connects never streams, and leaves no count.
            active = sum(1 for handle in self._handles if handle._response is not None)
            return {"active": active, "queued": len(self._handles) - active}

    def model_summary(self) -> dict[str, str | None]:
        """The upstream's model is only a name here: its dtype and quantisation are not known."""
        return {"dtype": None, "quantization": None}

    def prepare(self, request: GenerationRequest) -> None:
        """No local tokenizer: the upstream applies its own chat template and truncation."""
        if request.raw or request.params.logprobs is not None or request.params.prompt_logprobs:
            raise NotSupported("raw completions and logprobs are served by the local engine only; "
                               "call the upstream's own /v1/completions")
        return None

    def submit(self, request: GenerationRequest, prompt_ids: list[int] | None = None) -> UpstreamHandle:
        """Take a slot; raises QueueFull or EngineNotReady at once. The caller awaits handle.open()."""
        if not self.ready:
            raise EngineNotReady("the engine is not accepting requests")
        handle = UpstreamHandle(self, request)
        with self._lock:
            if len(self._handles) >= self.max_in_flight:
                raise QueueFull(f"{self.max_in_flight} requests are already in flight to the upstream")
            self._handles.add(handle)
        return handle

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Event]:
        handle = self.submit(request)
        await handle.open()
        async for event in handle:
            yield event

    # ----- internals -----

    def _release(self, handle: UpstreamHandle) -> None:
        with self._lock:
            self._handles.discard(handle)

    def _get_client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            headers = {"Accept": "text/event-stream"}
            if self.api_key:
                headers["Authorization"] = f"Bearer {self.api_key}"
            timeout = httpx.Timeout(self.timeout_s, connect=min(CONNECT_TIMEOUT_S, self.timeout_s),
                                    pool=min(CONNECT_TIMEOUT_S, self.timeout_s))
            limits = httpx.Limits(max_connections=self.max_in_flight,
                                  max_keepalive_connections=self.max_connections)
            # trust_env=False: the upstream is an internal host; an HTTP(S)_PROXY meant for the internet
            # must not capture it.
            self._client = httpx.AsyncClient(timeout=timeout, limits=limits, headers=headers, trust_env=False)
            self._loop = loop
        return self._client

    async def _send(self, request: GenerationRequest) -> httpx.Response:
        if not self.ready:
            raise EngineNotReady("the engine is not accepting requests")
        client = self._get_client()
        outgoing = client.build_request("POST", self.url, json=build_body(request, self.model))
        if request.request_id:
            outgoing.headers["X-Request-ID"] = request.request_id
        try:
            response = await asyncio.wait_for(client.send(outgoing, stream=True),
                                              timeout=min(OPEN_TIMEOUT_S, self.timeout_s))
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise UpstreamError(f"the upstream at {self.base_url} did not answer in time") from exc
        except (httpx.HTTPError, OSError) as exc:
            raise UpstreamError(f"the upstream at {self.base_url} is unreachable: {type(exc).__name__}") from exc
        if response.status_code == 200:
            return response
        try:
            detail = (await asyncio.wait_for(response.aread(), CONNECT_TIMEOUT_S))[:500].decode("utf-8", "replace")
        except Exception:  # noqa: BLE001 - the status alone is enough to report
            detail = ""
        finally:
            await response.aclose()
        status = response.status_code
        if status in (400, 413, 422) and any(h in detail.lower() for h in _TOO_LONG_HINTS):
            raise PromptTooLong(f"the upstream rejected the prompt as too long: {_message(detail)}")
        if status in (401, 403):
            raise UpstreamError(f"the upstream refused the credentials (HTTP {status}): "
                                "check DOCTORGLM_UPSTREAM_API_KEY")
        raise UpstreamError(f"the upstream answered HTTP {status}: {_message(detail)}")


def _message(detail: str) -> str:
    """The error message from an OpenAI-style error body, else the body's beginning."""
    try:
        body = json.loads(detail)
        error = body.get("error", body) if isinstance(body, dict) else body
        if isinstance(error, dict):
            return str(error.get("message") or error.get("code") or error)[:200]
        return str(error)[:200]
    except (ValueError, AttributeError):
        return detail[:200] or "no details"


__all__ = ["UpstreamEngine", "UpstreamHandle", "build_body", "build_messages"]
