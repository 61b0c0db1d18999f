"""Hardening from the adversarial test (issue 17, defects 1, 5, 6, 7, 8), through the real server.

Raw-socket cases (timeouts, header size, connection cap, unparsable requests) are in test_api_sockets.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api_support import QUESTION, metric_samples, read_jsonl
from tests.server import RunningServer, start_server

KEY = "sk-hardening-5c1d9e7a3b"
TRUSTED = "127.0.0.1,localhost,*.hospital.example"
SURROGATE = "头痛\ud800"  # json.dumps writes it as the escape \ud800, as the adversarial client sent it


@pytest.fixture(scope="module")
def keyed(cache_dir: Path, default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Keys on with the defaults for what they protect, trusted hosts, a short context budget."""
    logs = tmp_path_factory.mktemp("hardening")
    running = start_server(cache_dir, logs, {
        "DOCTORGLM_API_KEYS": KEY, "DOCTORGLM_AUDIT_LOG": str(logs / "audit.jsonl"),
        "DOCTORGLM_TRUSTED_HOSTS": TRUSTED, "DOCTORGLM_CONTEXT_TOKENS": "512"})
    running.audit_path = logs / "audit.jsonl"  # type: ignore[attr-defined]
    yield running
    running.stop()


@pytest.fixture(scope="module")
def busy(cache_dir: Path, default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Keys on but docs and metrics opened by setting; one generation row and a short queue."""
    logs = tmp_path_factory.mktemp("busy")
    running = start_server(cache_dir, logs, {
        "DOCTORGLM_API_KEYS": KEY, "DOCTORGLM_PROTECT_DOCS": "false", "DOCTORGLM_PROTECT_METRICS": "false",
        "DOCTORGLM_MAX_BATCH_SIZE": "1", "DOCTORGLM_MAX_QUEUE": "4"})
    yield running
    running.stop()


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def post_raw(url: str, path: str, body: dict[str, Any], headers: dict[str, str] | None = None,
             **kwargs: Any) -> httpx.Response:
    """JSON written with ensure_ascii, so a lone surrogate travels as its \\ud800 escape."""
    return httpx.post(url + path, content=json.dumps(body).encode(), timeout=60,
                      headers={"content-type": "application/json", **(headers or {})}, **kwargs)


def audit_records(path: Path, prefix: str, count: int) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + 5
    while True:
        found = {r["request_id"]: r for r in read_jsonl(path) if str(r.get("request_id", "")).startswith(prefix)}
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


# ----- 1: content parts and every nested string -----

def _oai(content: Any, history: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    return {"messages": [*(history or []), {"role": "user", "content": content}], "max_tokens": 4, **extra}


PART_CASES = {
    "surrogate-part": _oai([{"type": "text", "text": SURROGATE}]),
    "surrogate-part-no-knowledge": _oai([{"type": "text", "text": SURROGATE}], use_knowledge=False),
    "surrogate-assistant-part": _oai("头痛", [{"role": "user", "content": "发烧"},
                                           {"role": "assistant", "content": [{"type": "text", "text": SURROGATE}]}]),
    "surrogate-string": _oai(SURROGATE),
    "int-text": _oai([{"type": "text", "text": 5}]),
    "null-text": _oai([{"type": "text", "text": None}]),
    "list-text": _oai([{"type": "text", "text": ["头痛"]}]),
    "object-text": _oai([{"type": "text", "text": {"a": "头痛"}}]),
    "part-not-object": _oai(["头痛"]),
    "image-part": _oai([{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]),
    "zero-width-part": _oai([{"type": "text", "text": "\u200b\u200c\u200d\ufeff"}]),
    "zero-width-string": _oai("\u2060\u200b \u200e"),
}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("case", sorted(PART_CASES))
def test_content_parts_are_validated_like_strings(server: RunningServer, case: str, stream: bool) -> None:
    rid = f"part-{case}-{stream}-{time.time_ns()}"
    r = post_raw(server.url, "/v1/chat/completions", {**PART_CASES[case], "stream": stream},
                 {"X-Request-ID": rid})
    assert r.status_code == 422, (case, r.status_code, r.text[:300])
    error = r.json()["error"]
    assert error["code"] == "invalid_request" and error["type"] == "invalid_request_error"
    record = audit_records(server.audit_path, rid, 1)[rid]
    assert (record["status"], record["error"]) == (422, "invalid_request")


def test_text_parts_still_work_and_join(server: RunningServer) -> None:
    r = post_raw(server.url, "/v1/chat/completions",
                 _oai([{"type": "text", "text": "孩子发烧三天，"}, {"type": "text", "text": "咳嗽有痰"}]))
    assert r.status_code == 200, r.text
    assert r.json()["doctorglm"]["keywords"]


@pytest.mark.parametrize("prompt", ["\u200b", "\u200b\u200c\ufeff\u2060", " \u200b\t\u00a0", "\u202e\u200f"])
def test_a_prompt_of_only_invisible_characters_is_422(server: RunningServer, prompt: str) -> None:
    for path in ("/chat", "/chat/stream"):
        r = post_raw(server.url, path, {"prompt": prompt, "max_new_tokens": 2})
        assert r.status_code == 422 and r.json()["error"]["param"] == "prompt", (path, r.text)
    r = httpx.get(server.url + "/knowledge/search", params={"q": prompt})
    assert r.status_code == 422, r.text


@pytest.mark.parametrize("body", [
    {"prompt": "头痛", "history": [[SURROGATE, "好"]]},
    {"prompt": "头痛", "history": [["发烧", SURROGATE]]},
    {"prompt": "头痛", "stop": [SURROGATE]},
    {"prompt": SURROGATE},
], ids=["history-question", "history-answer", "stop", "prompt"])
def test_lone_surrogates_anywhere_in_chat_are_422(server: RunningServer, body: dict[str, Any]) -> None:
    for stream in (False, True):
        r = post_raw(server.url, "/chat", {**body, "stream": stream, "max_new_tokens": 2})
        assert r.status_code == 422, (body, r.text)


# ----- 5: Host header -----

def test_a_trailing_slash_is_not_redirected_to_the_host_header(server: RunningServer, busy: RunningServer,
                                                                keyed: RunningServer) -> None:
    # no keys: 404 like any unknown path; keys: 401 first; trusted hosts set: the Host itself is refused
    for url, expected in ((server.url, 404), (busy.url, 401), (keyed.url, 400)):
        for method in ("POST", "GET"):
            r = httpx.request(method, url + "/chat/", json={"prompt": QUESTION}, headers={"Host": "evil.example"},
                              follow_redirects=False)
            assert "location" not in r.headers, r.headers
            assert r.status_code == expected and r.json()["error"]["code"], (url, method, r.text)


def test_trusted_hosts(keyed: RunningServer) -> None:
    port = keyed.url.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "hospital.example.evil.net", "127.0.0.2"):
        r = httpx.post(keyed.url + "/chat", json={"prompt": QUESTION}, headers={**auth(), "Host": host})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", host
    for host in (f"127.0.0.1:{port}", "localhost", "ehr.hospital.example"):
        r = httpx.post(keyed.url + "/chat", json={"prompt": QUESTION, "max_new_tokens": 2},
                       headers={**auth(), "Host": host}, timeout=60)
        assert r.status_code == 200, (host, r.text)


# ----- 6: statuses and records -----

def test_a_client_that_leaves_mid_body_is_recorded_499_with_its_key(keyed: RunningServer) -> None:
    host, port = keyed.url.removeprefix("http://").split(":")
    rid = f"midbody-{time.time_ns()}"
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall((f"POST /chat HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
                      f"X-Request-ID: {rid}\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n"
                      '{"prompt": "').encode())
        time.sleep(0.3)
    record = audit_records(keyed.audit_path, rid, 1)[rid]
    assert (record["status"], record["error"], record["route"]) == (499, "client_closed", "/chat")
    assert record["key_id"].startswith("key-")


def test_413_is_recorded_with_its_route(keyed: RunningServer) -> None:
    rid = f"big-{time.time_ns()}"
    r = httpx.post(keyed.url + "/v1/chat/completions", content=b"x" * 1_100_000,
                   headers={**auth(), "X-Request-ID": rid, "content-type": "application/json"}, timeout=30)
    assert r.status_code == 413
    record = audit_records(keyed.audit_path, rid, 1)[rid]
    assert (record["status"], record["route"], record["error"]) == (413, "/v1/chat/completions",
                                                                    "payload_too_large")


def test_head_on_the_page_and_probes(server: RunningServer) -> None:
    for path in ("/", "/healthz", "/readyz", "/metrics"):
        r = httpx.head(server.url + path)
        assert r.status_code == 200 and r.content == b"", path


@pytest.mark.parametrize("content_type", ["text/xml", "application/xml", "multipart/form-data; boundary=x",
                                          "image/png"])
def test_non_json_media_types_are_415(server: RunningServer, content_type: str) -> None:
    for path in ("/chat", "/v1/chat/completions"):
        r = httpx.post(server.url + path, content="<q>头痛</q>".encode(), headers={"content-type": content_type})
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", (path, r.text)


def test_auth_answers_before_the_body_is_read(keyed: RunningServer) -> None:
    for raw, headers in ((b"{not json", {"content-type": "application/json"}), (b"<x/>", {"content-type": "text/xml"}),
                         (b"x" * 1_100_000, {}), (b"{not json", {"X-API-Key": "wrong"})):
        r = httpx.post(keyed.url + "/chat", content=raw, headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", (headers, r.text)
    r = httpx.post(keyed.url + "/chat", content=b"{not json", headers={**auth(), "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


@pytest.mark.parametrize("path,body", [
    ("/chat", {"prompt": QUESTION, "min_new_tokens": 9, "max_new_tokens": 8}),
    ("/chat", {"prompt": QUESTION, "min_new_tokens": 300}),  # over the default max_new_tokens (256)
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": QUESTION}], "min_tokens": 9, "max_tokens": 8}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": QUESTION}], "min_tokens": 300}),
])
def test_min_tokens_over_max_tokens_is_422(server: RunningServer, path: str, body: dict[str, Any]) -> None:
    r = httpx.post(server.url + path, json=body, timeout=30)
    assert r.status_code == 422 and "must not exceed" in r.json()["error"]["message"], r.text


def test_surrounding_whitespace_in_a_key_is_ignored_on_both_headers(keyed: RunningServer) -> None:
    """One rule for both headers, with the spaces on the wire (raw socket: no client strips them)."""
    host, port = keyed.url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": QUESTION, "max_new_tokens": 2}).encode()
    for header in (f"Authorization: Bearer {KEY} ", f"Authorization: Bearer  {KEY}", f"X-API-Key: {KEY} ",
                   f"X-API-Key:  {KEY}\t", "X-API-Key:  ", f"X-API-Key: {KEY[:-1]} "):
        with socket.create_connection((host, int(port)), timeout=60) as sock:
            sock.sendall(f"POST /chat HTTP/1.1\r\nHost: 127.0.0.1\r\n{header}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        status = int(data.split(b" ", 2)[1])
        assert status == (401 if header.strip().endswith(("X-API-Key:", KEY[:-1])) else 200), (header, data[:200])


def test_v1_errors_carry_openai_type_and_param(server: RunningServer) -> None:
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": QUESTION}],
                                                              "temperature": 3})
    error = r.json()["error"]
    assert r.status_code == 422 and error["type"] == "invalid_request_error" and error["param"] == "temperature"
    assert set(error) >= {"code", "message", "request_id", "type", "param"}


# ----- 7: gauges, Retry-After, the real prompt limit -----

def test_the_schema_and_the_error_state_the_real_prompt_limit(keyed: RunningServer) -> None:
    schema = httpx.get(keyed.url + "/openapi.json", headers=auth()).json()
    prompt = schema["components"]["schemas"]["ChatRequest"]["properties"]["prompt"]
    assert prompt["maxLength"] == 4000 and "DOCTORGLM_CONTEXT_TOKENS (512)" in prompt["description"]
    long_question = ("我头痛发烧三天，咳嗽有痰，晚上睡不好。" * 400)[:3990]  # under maxLength, over 512 tokens
    r = httpx.post(keyed.url + "/chat", json={"prompt": long_question, "max_new_tokens": 8}, headers=auth(),
                   timeout=60)
    assert r.status_code == 422 and r.json()["error"]["code"] == "prompt_too_long", r.text
    assert "shorten" in r.json()["error"]["message"]


async def _long_streams(url: str, count: int, tokens: int) -> list[int]:
    body = {"prompt": QUESTION, "max_new_tokens": tokens, "min_new_tokens": tokens}
    async with httpx.AsyncClient(timeout=120) as client:
        async def one() -> int:
            r = await client.post(url + "/chat", json=body, headers=auth())
            return r.status_code

        return await asyncio.gather(*(one() for _ in range(count)))


def test_running_and_queued_are_published_apart(busy: RunningServer) -> None:
    async def scenario() -> tuple[list[int], list[tuple[float, float]]]:
        task = asyncio.ensure_future(_long_streams(busy.url, 4, 200))
        seen: list[tuple[float, float]] = []
        while not task.done():
            samples = await asyncio.to_thread(metric_samples, busy.url)
            seen.append((samples["doctorglm_active_streams"][0].value, samples["doctorglm_queued_requests"][0].value))
            await asyncio.sleep(0.05)
        return await task, seen

    statuses, seen = asyncio.run(scenario())
    print("(running, queued) seen:", sorted(set(seen)))
    assert statuses == [200] * 4
    assert max(running for running, _ in seen) == 1  # one generation row: never more running
    assert max(queued for _, queued in seen) >= 2
    assert metric_samples(busy.url)["doctorglm_queued_requests"][0].value == 0


def test_retry_after_follows_the_queue(busy: RunningServer) -> None:
    tokens = 256
    assert asyncio.run(_long_streams(busy.url, 1, tokens)) == [200]  # one answer timed: the service time

    async def burst() -> list[tuple[int, str | None]]:
        body = {"prompt": QUESTION, "max_new_tokens": tokens, "min_new_tokens": tokens}
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(delay: float) -> tuple[int, str | None]:
                await asyncio.sleep(delay)
                r = await client.post(busy.url + "/chat", json=body, headers=auth())
                return r.status_code, r.headers.get("retry-after")

            return await asyncio.gather(*(one(0.02 * i) for i in range(8)))

    started = time.monotonic()
    results = asyncio.run(burst())
    print(f"burst of 8 in {time.monotonic() - started:.1f}s: {results}")
    refused = [int(retry) for status, retry in results if status == 429 and retry]
    assert {status for status, _ in results} == {200, 429} and refused
    # 4 queued, each about the timed answer, one row: more than a second
    assert max(refused) >= 2


# ----- 8: what is open without a key -----

OPEN_ALWAYS = ("/", "/healthz", "/readyz")
DOCS_AND_METRICS = ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect", "/metrics")


def test_with_keys_only_the_page_and_probes_are_open_by_default(keyed: RunningServer) -> None:
    for path in OPEN_ALWAYS:
        assert httpx.get(keyed.url + path).status_code == 200, path
    for path in DOCS_AND_METRICS:
        assert httpx.get(keyed.url + path).status_code == 401, path
        assert httpx.get(keyed.url + path, headers=auth()).status_code == 200, path
    for path in ("/v1/models", "/knowledge/search?q=发烧", "/no/such/route", "/chat/"):
        assert httpx.get(keyed.url + path).status_code == 401, path


def test_docs_and_metrics_can_be_opened_by_setting(busy: RunningServer) -> None:
    for path in (*OPEN_ALWAYS, *DOCS_AND_METRICS):
        assert httpx.get(busy.url + path).status_code == 200, path
    assert httpx.get(busy.url + "/v1/models").status_code == 401


def test_the_page_sends_security_headers_and_its_policy_allows_its_own_script(server: RunningServer) -> None:
    r = httpx.get(server.url + "/")
    assert r.status_code == 200
    assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
    policy = dict(part.strip().split(" ", 1) for part in r.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'" and policy["frame-ancestors"] == "'none'"
    assert policy["connect-src"] == "'self'" and "unsafe-inline" not in r.headers["content-security-policy"]
    import base64
    import hashlib
    import re

    scripts = re.findall(r"<script>(.*?)</script>", r.text, flags=re.S)
    assert scripts
    for script in scripts:
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in policy["script-src"]
    assert httpx.get(server.url + "/healthz").headers["x-content-type-options"] == "nosniff"
