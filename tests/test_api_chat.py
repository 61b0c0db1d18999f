"""The skeleton's contract, against the real server on 127.0.0.1."""

from __future__ import annotations

import contextlib

import httpx

from tests.api_support import sse_events

QUESTION = "孩子发烧三天，咳嗽有痰，怎么办？"


def test_chat_returns_text_references_and_chatglm_fields(server) -> None:
    r = httpx.post(server.url + "/chat", json={"prompt": QUESTION, "max_new_tokens": 24, "min_new_tokens": 8},
                   timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    for field in ("response", "history", "status", "time", "id", "references", "keywords", "usage",
                  "finish_reason", "safety"):
        assert field in body
    assert body["status"] == 200
    assert body["references"], "a symptom question must carry at least one reference"
    top = body["references"][0]
    assert {"id", "name", "score", "matched_keywords", "matched_fields"} <= set(top)
    assert body["usage"]["completion_tokens"] >= 8
    assert body["history"][-1][0] == QUESTION
    assert body["safety"]["notice"] and body["response"].endswith(body["safety"]["notice"])
    assert r.headers["x-request-id"]


def test_stream_sends_meta_then_several_deltas_then_done(server) -> None:
    with httpx.stream("POST", server.url + "/chat/stream",
                      json={"prompt": QUESTION, "max_new_tokens": 32, "min_new_tokens": 32}, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    names = [n for n, _ in events]
    assert names[0] == "meta" and names[-1] == "done"
    assert names.count("delta") >= 3
    assert set(names[1:-1]) == {"delta"}
    meta, done = events[0][1], events[-1][1]
    assert meta["references"] and meta["safety"]["level"] in ("none", "emergency")
    assert done["usage"]["completion_tokens"] == 32
    assert done["finish_reason"] == "length"


def test_chat_with_stream_flag_is_sse(server) -> None:
    with httpx.stream("POST", server.url + "/chat", json={"prompt": QUESTION, "stream": True,
                                                         "max_new_tokens": 8}, timeout=60) as r:
        events = sse_events(r)
    assert events[0][0] == "meta" and events[-1][0] == "done"


def test_knowledge_search(server) -> None:
    r = httpx.get(server.url + "/knowledge/search", params={"q": "发烧 咳嗽 流鼻涕", "k": 3}, timeout=30)
    assert r.status_code == 200
    body = r.json()
    assert 1 <= len(body["results"]) <= 3
    assert body["results"][0]["score"] >= body["results"][-1]["score"]
    assert body["keywords"]


def test_missing_or_empty_prompt_is_422_json(server) -> None:
    for payload in ({}, {"prompt": ""}, {"prompt": "   "}, {"prompt": QUESTION, "temperature": 5}):
        r = httpx.post(server.url + "/chat", json=payload, timeout=30)
        assert r.status_code == 422, (payload, r.text)
        error = r.json()["error"]
        assert error["code"] == "invalid_request" and error["message"] and error["request_id"]


def test_malformed_json_is_400(server) -> None:
    r = httpx.post(server.url + "/chat", content=b'{"prompt": ', headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_json"


def test_health_and_ready(server) -> None:
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(server.url + "/readyz").json()
    assert ready["ready"] is True and ready["diseases"] >= 30


def test_non_streaming_client_that_leaves_stops_generation(server) -> None:
    import json
    import time
    import uuid

    rid = f"leave-{uuid.uuid4().hex[:8]}"
    body = {"prompt": QUESTION, "max_new_tokens": 512, "min_new_tokens": 512}
    with contextlib.suppress(httpx.TimeoutException):  # the client gives up and closes the connection
        httpx.post(server.url + "/chat", json=body, headers={"X-Request-ID": rid}, timeout=0.3)
    record = None
    for _ in range(100):
        records = [json.loads(line) for line in server.audit_path.read_text().splitlines() if rid in line]
        record = next((r for r in records if r.get("finish_reason")), None)
        if record:
            break
        time.sleep(0.1)
    assert record is not None, "the chat was never audited"
    assert record["finish_reason"] == "cancelled"
    assert record["completion_tokens"] < 512
