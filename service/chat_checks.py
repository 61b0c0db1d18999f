"""The checks of a chat turn that the schemas cannot make (they depend on this deployment's settings),
and the clean-up of history the client sends back."""

from __future__ import annotations

from llm.designer import NO_MATCH_NOTE, UNCERTAIN_NOTE

from .chat_turn import ChatInput
from .engine.types import SamplingParams
from .errors import APIError
from .settings import Settings


def strip_notice(answer: str, notice: str) -> str:
    """Answers we sent carry the safety notice; drop it when the client sends them back as history."""
    answer = answer.rstrip()
    for tail in (notice, *UNCERTAIN_NOTE.values(), *NO_MATCH_NOTE.values()):
        if tail and answer.endswith(tail):
            answer = answer[: -len(tail)].rstrip()
    return answer


def check_max_tokens(s: Settings, params: SamplingParams) -> None:
    """422 for an answer longer than DOCTORGLM_MAX_NEW_TOKENS (chat turns and raw completions alike)."""
    if params.max_new_tokens > s.max_new_tokens:
        raise APIError(422, "invalid_request",
                       f"max_new_tokens {params.max_new_tokens} is over the limit of {s.max_new_tokens}")


def check_limits(s: Settings, chat: ChatInput) -> None:
    """422 for a turn over this deployment's limits (input chars, history, max/min tokens)."""
    if len(chat.question) > s.max_input_chars:
        raise APIError(422, "input_too_long",
                       f"the question is {len(chat.question)} characters; the limit is {s.max_input_chars}")
    if len(chat.history) > s.max_history_turns:
        raise APIError(422, "history_too_long",
                       f"history has {len(chat.history)} turns; the limit is {s.max_history_turns}")
    total = sum(len(t.user) + len(t.assistant) for t in chat.history)
    if total > 8 * s.max_input_chars:
        raise APIError(422, "history_too_long", f"history has {total} characters; shorten it")
    check_max_tokens(s, chat.params)
    if chat.params.min_new_tokens > chat.params.max_new_tokens:
        raise APIError(422, "invalid_request", f"min_new_tokens {chat.params.min_new_tokens} must not exceed "
                                               f"max_new_tokens {chat.params.max_new_tokens}")
