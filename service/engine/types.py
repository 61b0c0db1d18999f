"""Plain data passed between the API layer and the engines."""

from __future__ import annotations

from dataclasses import dataclass, field

from llm.chat_format import ChatTurn, PromptTooLong


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings; they hold inside a batch. temperature 0 means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    min_new_tokens: int = 0
    # Raw completions (/v1/completions): log-probabilities of each generated token with this many
    # alternatives (None: none at all), and of the prompt's own tokens (echo).
    logprobs: int | None = None
    prompt_logprobs: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class GenerationRequest:
    """What the engine generates: the final user message after the prompt designer, plus history."""

    message: str
    history: list[ChatTurn] = field(default_factory=list)
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""
    # Raw completions: `message` is the whole prompt, tokenised as is (no chat template, no history), or
    # raw_ids are the prompt's token ids.
    raw: bool = False
    raw_ids: list[int] | None = None
    # The start of `message` that holds no patient text (the designer's brief and notes): the prompt cache may
    # keep its keys/values for later requests. Empty: nothing of this request is kept.
    shared_prefix: str = ""


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability under the model (before temperature or penalties), with the top alternatives."""

    token_id: int
    text: str
    logprob: float | None
    top: tuple[tuple[int, str, float], ...] = ()


@dataclass(frozen=True)
class TokenDelta:
    """New text for the client (may be empty for tokens that complete no character)."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()  # only when the request asked for them


@dataclass(frozen=True)
class PromptLogprobs:
    """The prompt's own tokens and their log-probabilities (the first has none); first event of an echo request."""

    tokens: tuple[TokenLogprob, ...]


@dataclass(frozen=True)
class Finished:
    """The last event of a request. finish_reason: stop | length | repetition | cancelled | error."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


class EngineError(RuntimeError):
    """Generation failed for this request (the engine itself keeps running)."""


class QueueFull(EngineError):
    """The bounded queue is full: the API answers 429 with Retry-After."""


class EngineNotReady(EngineError):
    """The model is not loaded, or the engine is draining: the API answers 503."""


class InvalidPrompt(EngineError):
    """The prompt cannot be generated from (e.g. a token id outside the vocabulary): the API answers 422."""


class NotSupported(EngineError):
    """This engine kind cannot do what the request asks (e.g. raw completions upstream): the API answers 400."""


class UpstreamError(EngineError):
    """The OpenAI-compatible upstream is down or answered an error: the API answers 503."""


__all__ = ["ChatTurn", "EngineError", "EngineNotReady", "Finished", "GenerationRequest", "InvalidPrompt",
           "NotSupported", "PromptLogprobs", "PromptTooLong", "QueueFull", "SamplingParams", "TokenDelta",
           "TokenLogprob", "UpstreamError"]
