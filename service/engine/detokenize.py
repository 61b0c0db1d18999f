"""Incremental detokenisation: emit only whole characters, never a half UTF-8 sequence.

Where the model directory names an answer post-processing (a converted ChatGLM's own chat() rule,
llm.answer_text), `text` is the processed answer: each push adds only what that rule has made final.
"""

from __future__ import annotations

from typing import Any

from llm.answer_text import AnswerStream, answer_kind


class IncrementalDecoder:
    """Decodes a growing token list; each push returns the newly completed text (prefix-offset method)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""
        kind = answer_kind(tokenizer)
        self.answer = AnswerStream(kind) if kind else None

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        full = decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            if self.answer is not None:
                new = self.answer.push(new)
            self.text += new
            return new
        return ""

    def flush(self) -> str:
        """At the end of a request: whatever is left, even an incomplete character."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        new = full[len(prefix):] if len(full) > len(prefix) else ""
        self.prefix_offset = self.read_offset = len(self.ids)
        if self.answer is not None:
            new = self.answer.push(new) + self.answer.finish()
        self.text += new
        return new
