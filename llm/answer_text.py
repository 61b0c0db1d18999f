"""The answer post-processing each original ChatGLM chat() applies, on a stream of text deltas.

ChatGLM-6B's process_response strips the answer, writes "[[训练时间]]" as "2023年" and turns the
half-width , ! : ; ? next to a CJK character into full-width; ChatGLM2's strips and replaces; ChatGLM3's,
for a plain-text answer, drops the empty metadata line, strips and replaces. A converted directory names
its rule in tokenizer_config.json (ANSWER_TEXT_KEY), so serving needs no family sniffing.

Streaming holds back only what a rule still needs: leading and trailing whitespace, a tail that could
begin "[[训练时间]]", and (ChatGLM-6B) a punctuation mark whose next character is not known yet.
"""

from __future__ import annotations

from typing import Any

ANSWER_TEXT_KEY = "doctorglm_answer_text"
CHATGLM_6B_ANSWER = "chatglm-6b"
CHATGLM2_ANSWER = "chatglm2"
# ChatGLM3's metadata line is whitespace for a plain answer, so strip() removes it: the ChatGLM2 rule.
# (A non-empty first line is a tool call there; this service has no tools and streams it as text.)
CHATGLM3_ANSWER = "chatglm3"
KINDS = (CHATGLM_6B_ANSWER, CHATGLM2_ANSWER, CHATGLM3_ANSWER)

TRAINING_TIME = "[[训练时间]]"
TRAINING_TIME_TEXT = "2023年"
FULL_WIDTH = {",": "，", "!": "！", ":": "：", ";": "；", "?": "？"}


def _is_cjk(char: str | None) -> bool:
    return char is not None and "\u4e00" <= char <= "\u9fff"


def _held_mark_prefix(text: str) -> int:
    """Length of the longest tail of text that is a proper prefix of TRAINING_TIME."""
    for size in range(min(len(text), len(TRAINING_TIME) - 1), 0, -1):
        if TRAINING_TIME.startswith(text[-size:]):
            return size
    return 0


class AnswerStream:
    """push(delta) returns the processed text that is now final; finish() returns the rest."""

    def __init__(self, kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown answer post-processing {kind!r} (known: {', '.join(KINDS)})")
        self.punctuation = kind == CHATGLM_6B_ANSWER
        self.pending = ""
        self.started = False
        self.previous: str | None = None  # last emitted (unconverted) character, for the CJK neighbour rule

    def push(self, delta: str) -> str:
        self.pending += delta
        if not self.started:
            self.pending = self.pending.lstrip()
            if not self.pending:
                return ""
            self.started = True
        self.pending = self.pending.replace(TRAINING_TIME, TRAINING_TIME_TEXT)
        text = self.pending
        hold = max(len(text) - len(text.rstrip()), _held_mark_prefix(text))
        if self.punctuation and hold == 0 and text and text[-1] in FULL_WIDTH:
            left = text[-2] if len(text) > 1 else self.previous
            hold = 0 if _is_cjk(left) else 1  # a CJK left neighbour decides; else the next character does
        return self._emit(len(text) - hold)

    def finish(self) -> str:
        self.pending = self.pending.strip().replace(TRAINING_TIME, TRAINING_TIME_TEXT)
        return self._emit(len(self.pending))

    def _emit(self, upto: int) -> str:
        text, self.pending = self.pending, self.pending[upto:]
        if upto <= 0:
            return ""
        if not self.punctuation:
            return text[:upto]
        out = []
        for i in range(upto):
            char = text[i]
            following = text[i + 1] if i + 1 < len(text) else None
            if char in FULL_WIDTH and (_is_cjk(self.previous) or _is_cjk(following)):
                out.append(FULL_WIDTH[char])
            else:
                out.append(char)
            self.previous = char
        return "".join(out)


def process_answer(kind: str, text: str) -> str:
    """The whole-answer form (what the original chat() returns for a plain-text answer)."""
    stream = AnswerStream(kind)
    return stream.push(text) + stream.finish()


def answer_kind(tokenizer: Any) -> str | None:
    """The rule a loaded tokenizer's directory names (None: answers pass through unchanged)."""
    kind = (getattr(tokenizer, "init_kwargs", None) or {}).get(ANSWER_TEXT_KEY)
    return kind if kind in KINDS else None
