"""Safety travels with every answer: red flags before any model text, the notice always."""

from __future__ import annotations

import httpx

from tests.api_support import sse_events

EMERGENCY = "我爸突然胸口剧痛，出了一身冷汗，左边胳膊也发麻，怎么办？"
ORDINARY = "最近有点流鼻涕，打喷嚏，没有发烧，怎么办？"


def test_emergency_json_puts_advice_first_and_keeps_references(server) -> None:
    r = httpx.post(server.url + "/chat", json={"prompt": EMERGENCY, "max_new_tokens": 16}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["safety"]["level"] == "emergency"
    assert body["safety"]["rules"]
    advice = body["safety"]["advice"]
    assert "120" in advice
    assert body["response"].startswith(advice)
    assert body["response"].endswith(body["safety"]["notice"])
    assert body["references"]
    # The references describe the suspected emergency (the rule's suspects), not what shares its words.
    assert body["references"][0]["name"] in {"急性心肌梗死", "心绞痛", "冠心病", "脑卒中"}


def test_emergency_stream_sends_safety_in_the_first_event(server) -> None:
    with httpx.stream("POST", server.url + "/chat/stream", json={"prompt": EMERGENCY, "max_new_tokens": 8},
                      timeout=60) as r:
        events = sse_events(r)
    name, meta = events[0]
    assert name == "meta"
    assert meta["safety"]["level"] == "emergency" and meta["safety"]["advice"]
    assert meta["safety"]["notice"]
    assert events[-1][1]["safety"]["notice"] == meta["safety"]["notice"]


def test_negated_complaint_is_not_an_emergency_but_still_has_the_notice(server) -> None:
    r = httpx.post(server.url + "/chat", json={"prompt": ORDINARY, "max_new_tokens": 8}, timeout=60)
    body = r.json()
    assert body["safety"]["level"] == "none" and body["safety"]["rules"] == []
    assert body["safety"]["notice"] and body["response"].endswith(body["safety"]["notice"])


def test_red_flag_in_history_counts(server) -> None:
    history = [["我今天早上突然说话不清楚，右边手脚没力气", "请问持续多久了？"]]
    r = httpx.post(server.url + "/chat", json={"prompt": "大概半小时了，现在该怎么办？", "history": history,
                                               "max_new_tokens": 8}, timeout=60)
    assert r.json()["safety"]["level"] == "emergency"


def test_openai_stream_shows_advice_and_notice_as_text(server) -> None:
    body = {"messages": [{"role": "user", "content": EMERGENCY}], "stream": True, "max_tokens": 8}
    contents: list[str] = []
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        import json

        for line in r.iter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                chunk = json.loads(line[5:])
                delta = chunk["choices"][0]["delta"]
                if delta.get("content"):
                    contents.append(delta["content"])
    assert "120" in contents[0]
    assert "本回答由人工智能生成" in contents[-1]


def test_uncertain_retrieval_says_so_in_the_answer(server) -> None:
    # Vague complaints do not single out one disease: the answer must say so, not present one as fact.
    r = httpx.post(server.url + "/chat", json={"prompt": "最近总觉得不太舒服，浑身没劲", "max_new_tokens": 8},
                   timeout=60)
    body = r.json()
    assert body["uncertain"] is True
    assert "不能确定" in body["response"] or "没有找到" in body["response"]
    assert body["response"].endswith(body["safety"]["notice"])


def test_history_sent_back_loses_our_notes(server) -> None:
    first = httpx.post(server.url + "/chat", json={"prompt": "最近总觉得不太舒服", "max_new_tokens": 8},
                       timeout=60).json()
    second = httpx.post(server.url + "/chat", json={"prompt": "还有点头晕", "history": first["history"],
                                                    "max_new_tokens": 8}, timeout=60)
    assert second.status_code == 200
    assert second.json()["history"][0][1] == first["response"]
