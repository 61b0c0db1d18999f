"""The one engine contract: what the service asks of the local engine and of the upstream engine alike.

Callers (conversation, runtime, __main__, routes) type against these Protocols and never probe an
engine for optional methods.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from .types import Finished, GenerationRequest, PromptLogprobs, TokenDelta

Event = TokenDelta | PromptLogprobs | Finished


@runtime_checkable
class EngineStream(Protocol):
    """One submitted request: `await open()` (connects, where there is anything to connect), then iterate
    its events (TokenDelta..., Finished; PromptLogprobs first when asked for); cancel() frees its slot."""

    prompt_tokens: int

    async def open(self) -> None: ...

    def cancel(self) -> None: ...

    def __aiter__(self) -> AsyncIterator[Event]: ...


@runtime_checkable
class Engine(Protocol):
    """An engine kind: `local` (the model in this process) or `openai` (an OpenAI-compatible upstream)."""

    kind: str
    model_name: str
    ready: bool

    def start(self) -> None: ...

    def stop(self, timeout: float = 5.0) -> None: ...

    def prepare(self, request: GenerationRequest) -> list[int] | None:
        """Prompt ids within the budget, or None when the engine does not tokenise (upstream).
        Raises PromptTooLong, or NotSupported for what this kind cannot do."""
        ...

    def submit(self, request: GenerationRequest, prompt_ids: list[int] | None = None) -> EngineStream:
        """Queue a request; raises QueueFull or EngineNotReady at once, never later."""
        ...

    def model_summary(self) -> dict[str, str | None]:
        """{"dtype", "quantization"} of the model that answers; both None where it runs elsewhere (upstream)."""
        ...

    def stats(self) -> dict[str, int]:
        """{"active": rows generating, "queued": requests waiting}; the local engine adds running totals
        "prompt_tokens", "prompt_cache_reused_tokens", "decode_steps", "decode_rows" (rows summed over steps),
        "decode_us", "prefills", "prefill_us" (worker time, microseconds) and the gauge "prompt_cache_bytes"."""
        ...

    def abort_all(self, message: str) -> None:
        """End every queued and running request with an error event (the end of a drain)."""
        ...


__all__ = ["Engine", "EngineStream", "Event"]
