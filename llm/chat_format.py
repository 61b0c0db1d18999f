"""Turn history + the current message into prompt token ids, within a token budget.

The one place serving and training format a conversation. Patient and EHR text is always encoded as
plain text: a typed "<|endoftext|>", "<|user|>" or "[gMASK]" is the characters it is made of, never a
control token. Only the chat template's own markers are special tokens.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatTurn:
    """One earlier exchange: what the patient said and what the assistant answered."""

    user: str
    assistant: str


class PromptTooLong(ValueError):
    """The current message alone exceeds the prompt budget (the API answers 422)."""


# Stands in for each message while the template renders, so its text can be put back as plain text.
# Private-use characters: no template escapes, trims or splits them.
_SLOT = "\U000f8000{}\U000f8001"
_SLOT_RE = re.compile("\U000f8000(\\d+)\U000f8001")


def chatglm_prompt(history: list[ChatTurn], message: str) -> str:
    """The ChatGLM-6B format (what DoctorGLM was trained on): [Round N]\\n问：...\\n答：..."""
    text = ""
    for number, turn in enumerate(history):
        text += f"[Round {number}]\n问：{turn.user}\n答：{turn.assistant}\n"
    return text + f"[Round {len(history)}]\n问：{message}\n答："


def encode_plain(tokenizer: Any, text: str, add_special_tokens: bool = False) -> list[int]:
    """Ids of text with no special token parsed from it (what any user- or EHR-supplied text needs)."""
    return list(tokenizer(text, add_special_tokens=add_special_tokens, split_special_tokens=True)["input_ids"])


def render(tokenizer: Any, history: list[ChatTurn], message: str) -> list[int]:
    """Token ids for a conversation: the tokenizer's chat template when it has one, else ChatGLM-6B."""
    if not getattr(tokenizer, "chat_template", None):
        return encode_plain(tokenizer, chatglm_prompt(history, message), add_special_tokens=True)
    contents = [text for turn in history for text in (turn.user, turn.assistant)] + [message]
    roles = ["user", "assistant"] * len(history) + ["user"]
    messages = [{"role": role, "content": _SLOT.format(i)} for i, role in enumerate(roles)]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if [int(n) for n in _SLOT_RE.findall(rendered)] != list(range(len(contents))):
        # The template rewrote a message: safe over exact, no marker at all is taken from the text.
        log.warning("the chat template rewrites message text: its markers are encoded as plain text")
        return encode_plain(tokenizer, tokenizer.apply_chat_template(
            [{"role": m["role"], "content": c} for m, c in zip(messages, contents, strict=True)],
            add_generation_prompt=True, tokenize=False))
    return _encode_rendered(tokenizer, rendered, contents)


def _encode_rendered(tokenizer: Any, rendered: str, contents: list[str]) -> list[int]:
    """The template's markers as their ids; the text between them, message text put back, as plain text.

    This is how the tokenizer itself encodes the whole string (it splits at added tokens and encodes the
    runs between them), except that no marker can come from a message.
    """
    markers = _marker_pattern(tokenizer)
    ids: list[int] = []
    run = ""
    # split() alternates template text and slot numbers: markers are looked for in the template text only.
    for index, piece in enumerate(_SLOT_RE.split(rendered)):
        if index % 2:
            run += contents[int(piece)]
            continue
        position = 0
        for match in markers.finditer(piece):
            ids += _encode_run(tokenizer, run + piece[position:match.start()], first=not ids)
            ids.append(tokenizer.convert_tokens_to_ids(match.group(0)))
            run, position = "", match.end()
        run += piece[position:]
    return ids + _encode_run(tokenizer, run, first=not ids)


def _encode_run(tokenizer: Any, run: str, first: bool) -> list[int]:
    if not run:
        return []
    if first or _runs_encode_alone(tokenizer):
        return encode_plain(tokenizer, run)
    # A tokenizer that adds a prefix only at the very start of a string (Metaspace "first"): encode the
    # run after a newline and drop the newline's ids, as transformers does for its sanitised chats.
    newline = encode_plain(tokenizer, "\n")
    ids = encode_plain(tokenizer, "\n" + run)
    return ids[len(newline):] if ids[:len(newline)] == newline else encode_plain(tokenizer, run)


def _runs_encode_alone(tokenizer: Any) -> bool:
    """Whether the text after a special token encodes as it would on its own (checked once per tokenizer)."""
    cached = getattr(tokenizer, "_doctorglm_runs_alone", None)
    if cached is None:
        specials = [t for t in tokenizer.all_special_tokens if t]
        cached = True
        if specials:
            marker = specials[0]
            whole = list(tokenizer(marker + "a b", add_special_tokens=False)["input_ids"])
            cached = whole == [tokenizer.convert_tokens_to_ids(marker), *encode_plain(tokenizer, "a b")]
        with contextlib.suppress(AttributeError):  # one that refuses new attributes is probed each time
            tokenizer._doctorglm_runs_alone = cached
    return cached


def _marker_pattern(tokenizer: Any) -> re.Pattern[str]:
    """Every added token, longest first; one spelled like a word matches only as a whole word."""
    tokens = tuple(sorted(tokenizer.added_tokens_encoder, key=len, reverse=True))
    cached = getattr(tokenizer, "_doctorglm_markers", None)
    if cached is not None and cached[0] == tokens:
        return cached[1]
    parts = [rf"(?<!\w){re.escape(t)}(?!\w)" if t.isalnum() else re.escape(t) for t in tokens if t]
    pattern = re.compile("|".join(parts) or "(?!)")
    with contextlib.suppress(AttributeError):
        tokenizer._doctorglm_markers = (tokens, pattern)
    return pattern


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
