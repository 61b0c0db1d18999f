"""Turn history + the current message into prompt token ids, within a token budget."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ChatTurn:
    """One earlier exchange: what the patient said and what the assistant answered."""

    user: str
    assistant: str


class PromptTooLong(ValueError):
    """The current message alone exceeds the prompt budget (the API answers 422)."""



def chatglm_prompt(history: list[ChatTurn], message: str) -> str:
    """The ChatGLM-6B format (what DoctorGLM was trained on): [Round N]\\n问：...\\n答：..."""
    text = ""
    for number, turn in enumerate(history):
        text += f"[Round {number}]\n问：{turn.user}\n答：{turn.assistant}\n"
    return text + f"[Round {len(history)}]\n问：{message}\n答："


def render(tokenizer: Any, history: list[ChatTurn], message: str) -> list[int]:
    """Token ids for a conversation: the tokenizer's chat template when it has one, else ChatGLM-6B."""
    if getattr(tokenizer, "chat_template", None):
        messages: list[dict[str, str]] = []
        for turn in history:
            messages += [{"role": "user", "content": turn.user}, {"role": "assistant", "content": turn.assistant}]
        messages.append({"role": "user", "content": message})
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        # transformers 5 returns a BatchEncoding here, older versions a list.
        ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
        return list(ids)
    return list(tokenizer(chatglm_prompt(history, message), add_special_tokens=True)["input_ids"])


def build_prompt_ids(tokenizer: Any, history: list[ChatTurn], message: str, budget: int) -> list[int]:
    """Drop the oldest turns until the prompt fits; a message too long on its own is an error."""
    kept = list(history)
    while True:
        ids = render(tokenizer, kept, message)
        if len(ids) <= budget:
            return ids
        if not kept:
            raise PromptTooLong(
                f"the question is {len(ids)} tokens with its context, over the prompt budget of {budget}: "
                "shorten it or lower max_new_tokens"
            )
        kept.pop(0)
