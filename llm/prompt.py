"""Prompt text, built in exactly one place for serving and for training.

`compose_message` is what the model sees for one patient turn; the training package imports it so
that what the model was trained on is what it is served.
"""

from __future__ import annotations

import re

_CJK = re.compile(r"[\u4e00-\u9fff]")

KNOWLEDGE_HEADER = "以下是与患者描述可能相关的疾病资料（来自知识库，仅供参考，请结合患者情况判断）："
ANSWER_INSTRUCTION_ZH = "请以医生的身份，结合以上资料，给出专业、简洁、有条理的回答，并说明何时需要就医。"
ANSWER_INSTRUCTION_EN = (
    "Answer as a doctor, in English, professionally and concisely, using the material above where it fits, "
    "and say when the patient should see a doctor in person."
)


def is_chinese(text: str) -> bool:
    """True when at least a fifth of the letters are CJK characters."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return True
    return sum(1 for c in letters if _CJK.match(c)) * 5 >= len(letters)


def question_label(question: str) -> str:
    return "患者的问题：" if is_chinese(question) else "Patient's question: "


def shared_beginning(question: str, brief: str = "", urgent_note: str = "") -> str:
    """The start of compose_message(question, brief, urgent_note) that holds no patient text (the urgent note,
    the library brief, the question's label): what the engine may keep for later prompts. Empty for a bare
    question."""
    if not brief and not urgent_note:
        return ""
    message = compose_message(question, brief, urgent_note)
    label = question_label(question)
    return message[:message.index(label + question.strip()) + len(label)]


def compose_message(question: str, brief: str = "", urgent_note: str = "") -> str:
    """The user message for the model: optional urgent note, optional disease brief, the question.

    Without a brief or a note the question is passed as it is (the plain dialogue format the base
    model and the LoRA data share).
    """
    question = question.strip()
    if not brief and not urgent_note:
        return question
    parts: list[str] = []
    if urgent_note:
        parts.append(urgent_note)
    if brief:
        parts.append(f"{KNOWLEDGE_HEADER}\n{brief}")
    parts.append(f"{question_label(question)}{question}")
    parts.append(ANSWER_INSTRUCTION_ZH if is_chinese(question) else ANSWER_INSTRUCTION_EN)
    return "\n\n".join(parts)
