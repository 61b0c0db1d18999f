"""Structured patient records (issue 16) through the real server: retrieval, triage, meta, and 422s."""

from __future__ import annotations

import httpx
import pytest

from tests.api_support import sse_events

RECORD = {"age_months": 2, "sex": "female", "symptoms": ["发热"], "negated_symptoms": ["咳嗽"]}


def test_search_with_a_record_only(server) -> None:
    record = {"age": 1, "symptoms": ["拉肚子", "呕吐"], "negated_symptoms": ["咳嗽"]}
    r = httpx.post(server.url + "/knowledge/search", json={"patient": record}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["results"] and "咳嗽" in body["negated"] and "咳嗽" not in body["keywords"]
    assert {"腹泻", "呕吐"} & set(body["keywords"])  # the listed findings, lay words made clinical
    assert body["patient"] == {"age_months": 12.0, "symptoms": ["拉肚子", "呕吐"], "negated_symptoms": ["咳嗽"]}


def test_search_text_and_record_combine(server) -> None:
    text_only = httpx.post(server.url + "/knowledge/search", json={"q": "头痛"}, timeout=30).json()
    both = httpx.post(server.url + "/knowledge/search",
                      json={"q": "头痛", "patient": {"symptoms": ["腹泻"]}}, timeout=30).json()
    assert "腹泻" in both["keywords"] and "腹泻" not in text_only["keywords"]
    assert both["patient"] == {"symptoms": ["腹泻"]} and text_only["patient"] == {}


@pytest.mark.parametrize("patient", [
    {"age": 131}, {"age": -1}, {"age": "3"}, {"age_months": 2000}, {"age": 3, "age_months": 36},
    {"sex": "unknown"}, {"symptoms": "发热"}, {"symptoms": ["发热"] * 51}, {"symptoms": ["x" * 65]},
    {"symptoms": [" "]}, {"symptoms": [3]}, {"negated_symptoms": ["\u200b"]}, {"blood_type": "A"},
])
def test_bad_records_are_422(server, patient: dict) -> None:
    for path, body in (("/knowledge/search", {"q": "发烧", "patient": patient}),
                       ("/chat", {"prompt": "发烧", "patient": patient, "max_new_tokens": 2})):
        r = httpx.post(server.url + path, json=body, timeout=30)
        assert r.status_code == 422, (path, patient, r.text)
        assert r.json()["error"]["code"] and r.json()["error"]["message"]


def test_search_needs_text_or_findings(server) -> None:
    r = httpx.post(server.url + "/knowledge/search", json={"patient": {"age": 30}}, timeout=30)
    assert r.status_code == 422 and "patient.symptoms" in r.json()["error"]["message"]


def test_chat_uses_the_record_for_triage_and_says_what_it_used(server) -> None:
    infant = httpx.post(server.url + "/chat", json={"prompt": "有点不舒服", "patient": RECORD, "max_new_tokens": 4},
                        timeout=60).json()
    older = httpx.post(server.url + "/chat", json={"prompt": "有点不舒服", "max_new_tokens": 4,
                                                     "patient": {**RECORD, "age_months": 30}}, timeout=60).json()
    assert infant["safety"]["level"] == "emergency"  # fever under three months, from the record alone
    assert older["safety"]["level"] != "emergency"
    assert infant["patient"] == {"age_months": 2.0, "sex": "female", "symptoms": ["发热"],
                                 "negated_symptoms": ["咳嗽"]}


def test_stream_meta_and_openai_extension_carry_the_record(server) -> None:
    with httpx.stream("POST", server.url + "/chat/stream",
                      json={"prompt": "拉肚子两天", "patient": {"age": 3, "symptoms": ["呕吐"]}, "max_new_tokens": 4},
                      timeout=60) as r:
        meta = sse_events(r)[0][1]
    assert meta["patient"] == {"age_months": 36.0, "symptoms": ["呕吐"]}
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"messages": [{"role": "user", "content": "拉肚子两天"}], "max_tokens": 4,
                         "patient": {"age": 3, "symptoms": ["呕吐"]}})
    assert r.status_code == 200, r.text
    assert r.json()["doctorglm"]["patient"] == {"age_months": 36.0, "symptoms": ["呕吐"]}
    bad = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                     json={"messages": [{"role": "user", "content": "x"}], "patient": {"sex": "other"}})
    assert bad.status_code == 422
