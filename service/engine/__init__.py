"""The engine owns the model and the accelerator: the only place that runs generation."""

from .types import (
    ChatTurn,
    EngineError,
    EngineNotReady,
    Finished,
    GenerationRequest,
    PromptTooLong,
    QueueFull,
    SamplingParams,
    TokenDelta,
    UpstreamError,
)

__all__ = [
    "ChatTurn",
    "EngineError",
    "EngineNotReady",
    "Finished",
    "GenerationRequest",
    "PromptTooLong",
    "QueueFull",
    "SamplingParams",
    "TokenDelta",
    "UpstreamError",
]
