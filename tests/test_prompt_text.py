"""The designed message's shared beginning: what the prompt cache may keep holds no patient text."""

from __future__ import annotations

import pytest

from llm.prompt import compose_message, shared_beginning

BRIEF = "【上呼吸道感染】症状：发热、咳嗽、流涕。"


@pytest.mark.parametrize("question, brief, note", [
    ("孩子发烧三天，咳嗽有痰", BRIEF, ""),
    ("孩子发烧三天，咳嗽有痰", BRIEF, "【紧急提示】请立即就医。"),
    ("  My child has had a fever for three days  ", BRIEF, ""),
    ("胸口剧痛", "", "【紧急提示】请立即拨打120。"),
])
def test_the_shared_beginning_is_the_message_up_to_the_question(question: str, brief: str, note: str) -> None:
    message = compose_message(question, brief, note)
    shared = shared_beginning(question, brief, note)
    assert message.startswith(shared) and question.strip() not in shared
    assert message[len(shared):].startswith(question.strip())
    assert (brief or note) in shared


def test_a_bare_question_shares_nothing() -> None:
    assert shared_beginning("孩子发烧三天") == "" and compose_message("孩子发烧三天") == "孩子发烧三天"
