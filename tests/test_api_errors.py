"""Errors and limits, request ids, CORS default, /metrics — against the shared real server."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.api_support import QUESTION, metric_samples, read_jsonl

OK = {"prompt": QUESTION, "max_new_tokens": 2}
OAI = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 2}

CHAT_INVALID = [
    {"prompt": ""},
    {"prompt": "   "},
    {"prompt": 5},
    {"prompt": "x" * 32_001},  # hard ceiling
    {"prompt": "x" * 4_001},  # DOCTORGLM_MAX_INPUT_CHARS default 4000
    {"temperature": -0.1}, {"temperature": 2.01},
    {"top_p": 0}, {"top_p": 1.01},
    {"top_k": -1}, {"top_k": 1001},
    {"max_new_tokens": 0}, {"max_new_tokens": 513},  # over DOCTORGLM_MAX_NEW_TOKENS (512)
    {"min_new_tokens": -1},
    {"repetition_penalty": 0.4}, {"repetition_penalty": 2.1},
    {"seed": -1},
    {"max_length": 15},
    {"stop": ["a", "b", "c", "d", "e"]}, {"stop": [""]}, {"stop": ["x" * 33]},
    {"history": [["only one"]]},
    {"history": [["q", "a"]] * 21},  # DOCTORGLM_MAX_HISTORY_TURNS default 20
    {"stream": "maybe"},
    {"unknown_field": 1},
]
OAI_INVALID = [
    {"messages": []},
    {"messages": [{"role": "alien", "content": "x"}]},
    {"messages": [{"role": "assistant", "content": "x"}]},
    {"temperature": 2.5}, {"top_p": 0}, {"max_tokens": 0}, {"max_tokens": 9000}, {"max_tokens": 600},
    {"n": 2}, {"stop": ["a", "b", "c", "d", "e"]}, {"stop": ""}, {"seed": -5}, {"model": "m" * 257},
]


@pytest.mark.parametrize("change", CHAT_INVALID, ids=lambda c: ",".join(c) or "empty")
def test_chat_field_bounds_are_422(server, change: dict) -> None:
    r = httpx.post(server.url + "/chat", json={**OK, **change}, timeout=30)
    assert r.status_code == 422, (change, r.text)
    error = r.json()["error"]
    assert error["code"] in ("invalid_request", "input_too_long", "history_too_long")
    assert error["message"] and error["request_id"] == r.headers["x-request-id"]


@pytest.mark.parametrize("change", OAI_INVALID, ids=lambda c: ",".join(c))
def test_openai_field_bounds_are_422(server, change: dict) -> None:
    r = httpx.post(server.url + "/v1/chat/completions", json={**OAI, **change}, timeout=30)
    assert r.status_code == 422, (change, r.text)
    assert r.json()["error"]["code"] == "invalid_request"


def test_knowledge_query_bounds(server) -> None:
    for params in ({"q": ""}, {"q": "  "}, {"q": "发烧", "k": 0}, {"q": "发烧", "k": 51}, {"q": "x" * 4001}):
        assert httpx.get(server.url + "/knowledge/search", params=params).status_code == 422, params


@pytest.mark.parametrize("raw", [b'{"prompt": ', b"not json", b'{"prompt": "\xff\xfe"}', b"\xc3\x28", b"\x00"],
                         ids=["truncated", "text", "bad-utf8-in-string", "bad-utf8", "nul"])
def test_malformed_body_is_400(server, raw: bytes) -> None:
    for path in ("/chat", "/chat/stream", "/v1/chat/completions"):
        r = httpx.post(server.url + path, content=raw, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 400, (path, raw, r.text)
        assert r.json()["error"]["code"] == "invalid_json"


def test_oversized_body_is_413_with_or_without_length(server) -> None:
    big = json.dumps({"prompt": "x" * 1_100_000}).encode()
    r = httpx.post(server.url + "/chat", content=big, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

    def chunks():  # no Content-Length: chunked transfer encoding
        for start in range(0, len(big), 65536):
            yield big[start:start + 65536]

    r = httpx.post(server.url + "/v1/chat/completions", content=chunks(),
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    assert httpx.post(server.url + "/chat", json=OK, timeout=60).status_code == 200


def test_unknown_route_and_method_use_the_error_shape(server) -> None:
    r = httpx.get(server.url + "/no/such/path")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(server.url + "/chat")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_request_id_echoed_generated_and_logged(server) -> None:
    rid = f"ehr-{time.time_ns()}"
    r = httpx.post(server.url + "/chat", json=OK, headers={"X-Request-ID": rid}, timeout=60)
    assert r.status_code == 200 and r.headers["x-request-id"] == rid
    bad = httpx.post(server.url + "/chat", json={"prompt": ""}, headers={"X-Request-ID": rid + "-bad"})
    assert bad.json()["error"]["request_id"] == rid + "-bad"
    generated = httpx.get(server.url + "/healthz").headers["x-request-id"]
    assert len(generated) == 32
    unsafe = httpx.get(server.url + "/healthz", headers={"X-Request-ID": "a b\tc"}).headers["x-request-id"]
    assert unsafe != "a b\tc"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
        mine = [entry for entry in lines if entry.get("request_id") == rid]
        if {"request", "chat finished"} <= {entry["msg"] for entry in mine}:
            break
        time.sleep(0.1)
    assert {"request", "chat finished"} <= {entry["msg"] for entry in mine}
    assert all(QUESTION not in json.dumps(entry, ensure_ascii=False) for entry in lines)  # no patient text


def test_cors_is_off_by_default(server) -> None:
    preflight = httpx.options(server.url + "/chat", headers={"Origin": "https://evil.example",
                                                             "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    r = httpx.get(server.url + "/healthz", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_audit_has_one_record_per_request_without_text(server) -> None:
    rid = f"audit-{time.time_ns()}"
    ok = httpx.post(server.url + "/chat", json=OK, headers={"X-Request-ID": rid + "-ok"}, timeout=60)
    bad = httpx.post(server.url + "/chat", json={"prompt": ""}, headers={"X-Request-ID": rid + "-422"})
    junk = httpx.post(server.url + "/chat", content=b"{", headers={"X-Request-ID": rid + "-400"})  # no content-type
    search = httpx.get(server.url + "/knowledge/search", params={"q": QUESTION}, headers={"X-Request-ID": rid + "-q"})
    assert (ok.status_code, bad.status_code, junk.status_code, search.status_code) == (200, 422, 400, 200)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        records = [r for r in read_jsonl(server.audit_path) if str(r.get("request_id", "")).startswith(rid)]
        if len(records) >= 4:
            break
        time.sleep(0.1)
    by_id = {r["request_id"].removeprefix(rid): r for r in records}
    assert len(records) == 4 and set(by_id) == {"-ok", "-422", "-400", "-q"}
    assert by_id["-ok"]["status"] == 200 and by_id["-ok"]["finish_reason"] in ("length", "stop", "repetition")
    assert by_id["-ok"]["references"] and by_id["-ok"]["key_id"] == "anonymous"
    assert by_id["-ok"]["completion_tokens"] >= 1 and by_id["-ok"]["latency_ms"] > 0
    assert (by_id["-422"]["status"], by_id["-422"]["error"]) == (422, "invalid_request")
    assert (by_id["-400"]["status"], by_id["-400"]["error"]) == (400, "invalid_json")
    text = server.audit_path.read_text(encoding="utf-8")
    assert QUESTION not in text and "question" not in text and '"answer"' not in text


def test_metrics_parse_with_the_required_families(server) -> None:
    assert httpx.post(server.url + "/chat", json={**OK, "max_new_tokens": 4, "min_new_tokens": 4},
                      timeout=60).status_code == 200
    httpx.post(server.url + "/chat", json={"prompt": ""})
    families = metric_samples(server.url)
    for name in ("doctorglm_requests", "doctorglm_request_seconds", "doctorglm_time_to_first_token_seconds",
                 "doctorglm_generated_tokens", "doctorglm_queue_depth", "doctorglm_active_streams",
                 "doctorglm_retrieval_seconds"):
        assert name in families, name
    requests = {(s.labels["route"], s.labels["status"]) for s in families["doctorglm_requests"]
                if s.name == "doctorglm_requests_total"}
    assert ("/chat", "200") in requests and ("/chat", "422") in requests
    counts = {s.name: s.value for fam in families.values() for s in fam if s.name.endswith("_count")}
    assert counts["doctorglm_time_to_first_token_seconds_count"] >= 1
    assert counts["doctorglm_retrieval_seconds_count"] >= 1
    tokens = [s.value for s in families["doctorglm_generated_tokens"] if s.name.endswith("_total")]
    assert tokens and tokens[0] >= 4
    # The same question again: its designed prompt's beginning (template and brief) comes from the prompt cache.
    def totals(families: dict) -> tuple[float, float]:
        return tuple(next(s.value for s in families[name] if s.name == name + "_total")
                     for name in ("doctorglm_prompt_tokens", "doctorglm_prompt_cache_reused_tokens"))

    prompt_before, reused_before = totals(families)
    assert httpx.post(server.url + "/chat", json={**OK, "max_new_tokens": 4, "min_new_tokens": 4},
                      timeout=60).status_code == 200
    after = metric_samples(server.url)
    prompt_after, reused_after = totals(after)
    assert prompt_after > prompt_before and reused_after >= reused_before + 32
    assert after["doctorglm_prompt_cache_bytes"][0].value > 0
    # The worker's time: the 4-token answer took decode steps of one row and one prefill.
    def total(families: dict, name: str) -> float:
        return next(s.value for s in families[name] if s.name == name + "_total")

    steps = total(after, "doctorglm_decode_steps") - total(families, "doctorglm_decode_steps")
    assert steps >= 3
    # One request: every step had exactly one row (rows >= steps holds for any counting at all).
    assert total(after, "doctorglm_decode_rows") - total(families, "doctorglm_decode_rows") == steps
    decode_s = total(after, "doctorglm_decode_seconds") - total(families, "doctorglm_decode_seconds")
    assert 0 < decode_s < 60  # seconds, not microseconds: the request took well under a minute
    assert total(after, "doctorglm_prefills") == total(families, "doctorglm_prefills") + 1
    assert total(after, "doctorglm_prefill_seconds") > total(families, "doctorglm_prefill_seconds")
    # Labels stay bounded: random paths are one "unmatched" route, never their own label.
    for i in range(5):
        httpx.get(server.url + f"/random-{i}-{time.time_ns()}")
    routes = {s.labels["route"] for s in metric_samples(server.url)["doctorglm_requests"]}
    assert not any(route.startswith("/random-") for route in routes) and "unmatched" in routes


def test_json_without_json_content_type_is_accepted(server) -> None:
    """ChatGLM api.py read the body as JSON whatever the header: requests' data=..., curl -d."""
    raw = json.dumps(OK).encode()
    for headers in ({}, {"content-type": "application/x-www-form-urlencoded"}, {"content-type": "text/plain"}):
        r = httpx.post(server.url + "/chat", content=raw, headers=headers, timeout=60)
        assert r.status_code == 200, (headers, r.text)
