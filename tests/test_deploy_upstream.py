"""DOCTORGLM_ENGINE=openai: a real instance of this service forwards generation to a second real instance.

Prompt design, references, safety and audit stay in the front instance; the upstream only generates.
The in-process tests at the end pin the failure modes (hang, 5xx, bad key, too long, full) without servers.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import httpx
import pytest

from service.engine.types import GenerationRequest, PromptTooLong, QueueFull, SamplingParams, UpstreamError
from service.engine.upstream import UpstreamEngine, build_body
from service.settings import Settings
from tests.api_support import sse_events
from tests.server import RunningServer, start_server

QUESTION = "孩子发烧三天，咳嗽有痰，怎么办？"


def audit_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def metric(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+([0-9.eE+-]+)$", re.M)
    return sum(float(m.group(2)) for m in pattern.finditer(text) if labels in (m.group(1) or ""))


@pytest.fixture(scope="module")
def pair(cache_dir: Path, default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """(upstream, front): the front runs DOCTORGLM_ENGINE=openai against the upstream's /v1."""
    logs = tmp_path_factory.mktemp("upstream")
    upstream = start_server(cache_dir, logs / "up", {"DOCTORGLM_AUDIT_LOG": str(logs / "up-audit.jsonl")})
    front: RunningServer | None = None
    try:
        front = start_server(cache_dir, logs / "front", {
            "DOCTORGLM_ENGINE": "openai", "DOCTORGLM_UPSTREAM_URL": upstream.url + "/v1",
            "DOCTORGLM_UPSTREAM_TIMEOUT_S": "20", "DOCTORGLM_AUDIT_LOG": str(logs / "front-audit.jsonl")})
        upstream.audit_path = logs / "up-audit.jsonl"  # type: ignore[attr-defined]
        front.audit_path = logs / "front-audit.jsonl"  # type: ignore[attr-defined]
        yield upstream, front
    finally:
        if front is not None:
            front.stop()
        upstream.stop()


def test_front_reports_the_upstream_engine(pair) -> None:
    _, front = pair
    ready = httpx.get(front.url + "/readyz", timeout=10).json()
    assert ready["ready"] and ready["engine"] == "openai"
    assert ready["model"].startswith("upstream:")


def test_chat_through_the_upstream_has_references_designed_here(pair) -> None:
    upstream, front = pair
    rid = "deploy-upstream-chat-1"
    r = httpx.post(front.url + "/chat", json={"prompt": QUESTION, "max_new_tokens": 24, "min_new_tokens": 8},
                   headers={"X-Request-ID": rid}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["references"], "the front designs the prompt: references come from its library"
    assert body["usage"]["completion_tokens"] >= 8, "usage comes from the upstream's final chunk"
    notice = body["safety"]["notice"]
    assert body["response"].endswith(notice) and body["response"].count(notice) == 1, \
        "the upstream's own notice must not be repeated"
    # The upstream saw the request (same request id) with use_knowledge off: no second prompt design there.
    time.sleep(0.2)
    seen = [rec for rec in audit_records(upstream.audit_path) if rec.get("request_id") == rid]
    assert seen and seen[-1]["route"] == "/v1/chat/completions" and seen[-1]["references"] == []
    assert seen[-1]["completion_tokens"] == body["usage"]["completion_tokens"]
    mine = [rec for rec in audit_records(front.audit_path) if rec.get("request_id") == rid]
    assert mine and mine[-1]["status"] == 200 and mine[-1]["references"]


def test_stream_through_the_upstream(pair) -> None:
    _, front = pair
    with httpx.stream("POST", front.url + "/chat/stream",
                      json={"prompt": QUESTION, "max_new_tokens": 32, "min_new_tokens": 32}, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    names = [n for n, _ in events]
    assert names[0] == "meta" and names[-1] == "done", names
    assert names.count("delta") >= 3 and set(names[1:-1]) == {"delta"}
    assert events[0][1]["references"]
    done = events[-1][1]
    assert done["finish_reason"] == "length" and done["usage"]["completion_tokens"] == 32
    text = "".join(p["text"] for n, p in events if n == "delta")
    assert events[0][1]["safety"]["notice"] not in text


def test_openai_endpoint_of_the_front_streams(pair) -> None:
    _, front = pair
    body = {"messages": [{"role": "user", "content": QUESTION}], "stream": True, "max_tokens": 16, "min_tokens": 16}
    chunks = []
    with httpx.stream("POST", front.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                chunks.append(json.loads(line[5:]))
    assert chunks[0]["doctorglm"]["references"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_client_going_away_closes_the_upstream_stream(pair) -> None:
    upstream, front = pair
    before = metric(upstream.url, "doctorglm_finish_reasons_total", 'reason="cancelled"')
    with httpx.stream("POST", front.url + "/chat/stream",
                      json={"prompt": QUESTION, "max_new_tokens": 500, "min_new_tokens": 500}, timeout=60) as r:
        deltas = 0
        for line in r.iter_lines():
            if line.startswith("event: delta"):
                deltas += 1
                if deltas >= 2:
                    break
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if metric(upstream.url, "doctorglm_finish_reasons_total", 'reason="cancelled"') > before:
            break
        time.sleep(0.1)
    assert metric(upstream.url, "doctorglm_finish_reasons_total", 'reason="cancelled"') > before
    assert httpx.get(front.url + "/readyz", timeout=10).json()["ready"]


def test_upstream_down_is_503_upstream_unavailable_fast(pair) -> None:
    """Runs last in this module: it stops the upstream."""
    upstream, front = pair
    upstream.stop()
    for path, extra in (("/chat", {}), ("/chat/stream", {}), ("/chat", {"stream": True})):
        started = time.monotonic()
        r = httpx.post(front.url + path, json={"prompt": QUESTION, "max_new_tokens": 8, **extra}, timeout=30)
        elapsed = time.monotonic() - started
        assert r.status_code == 503, (path, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/json")
        assert r.json()["error"]["code"] == "upstream_unavailable"
        assert r.headers.get("retry-after")
        assert elapsed < 5, f"{path} took {elapsed:.1f}s"
    # The front itself stays up and keeps saying so; its audit log records the refusals.
    assert httpx.get(front.url + "/healthz", timeout=5).status_code == 200
    errors = [rec for rec in audit_records(front.audit_path) if rec.get("error") == "upstream_unavailable"]
    assert len(errors) >= 3


# ----- in-process: failure modes against tiny fake upstreams -----

def _settings(url: str, **extra: object) -> Settings:
    return Settings(engine="openai", upstream_url=url, **extra)


def _request(**params: object) -> GenerationRequest:
    return GenerationRequest(message="问题", params=SamplingParams(**params))


async def _fake_upstream(reply: bytes | None) -> tuple[asyncio.Server, str]:
    """An HTTP server that sends `reply` to every request, or holds the connection open when None."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            if reply is None:
                await asyncio.sleep(30)
            else:
                writer.write(reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/v1"


def _http(status: int, body: str, content_type: str = "application/json") -> bytes:
    data = body.encode()
    return (f"HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {len(data)}\r\n"
            "Connection: close\r\n\r\n").encode() + data


async def _open(reply: bytes | None, **settings: object) -> Exception | list:
    server, url = await _fake_upstream(reply)
    engine = UpstreamEngine(_settings(url, **settings))
    engine.start()
    try:
        handle = engine.submit(_request())
        try:
            await handle.open()
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            return exc
        return [event async for event in handle]
    finally:
        assert engine.stats() == {"active": 0, "queued": 0}, "every path frees its slot"
        await asyncio.to_thread(engine.stop)
        server.close()


def test_hanging_upstream_fails_within_the_timeout() -> None:
    started = time.monotonic()
    result = asyncio.run(_open(None, upstream_timeout_s=1.0))
    assert isinstance(result, UpstreamError) and "in time" in str(result)
    assert time.monotonic() - started < 4


@pytest.mark.parametrize(("reply", "kind", "words"), [
    (_http(500, '{"error":{"message":"boom"}}'), UpstreamError, "HTTP 500: boom"),
    (_http(401, '{"error":"no"}'), UpstreamError, "DOCTORGLM_UPSTREAM_API_KEY"),
    (_http(400, '{"error":{"message":"maximum context length is 2048 tokens"}}'), PromptTooLong, "too long"),
])
def test_upstream_errors_map_to_engine_errors(reply: bytes, kind: type, words: str) -> None:
    result = asyncio.run(_open(reply))
    assert isinstance(result, kind) and words in str(result), result


def test_plain_openai_stream_without_usage() -> None:
    chunks = [{"choices": [{"index": 0, "delta": {"content": t}, "finish_reason": None}]} for t in ("你", "好")]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    events = asyncio.run(_open(_http(200, body, "text/event-stream")))
    assert [getattr(e, "text", None) for e in events[:-1]] == ["你", "好"]
    assert events[-1].finish_reason == "stop" and events[-1].completion_tokens == 0


def test_truncated_stream_is_an_upstream_error() -> None:
    body = 'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'

    async def run() -> Exception | None:
        server, url = await _fake_upstream(_http(200, body, "text/event-stream"))
        engine = UpstreamEngine(_settings(url))
        engine.start()
        handle = engine.submit(_request())
        await handle.open()
        try:
            async for _ in handle:
                pass
        except UpstreamError as exc:
            return exc
        finally:
            await asyncio.to_thread(engine.stop)
            server.close()
        return None

    assert isinstance(asyncio.run(run()), UpstreamError)


def test_in_flight_is_bounded_and_not_ready_before_start() -> None:
    engine = UpstreamEngine(_settings("http://127.0.0.1:9/v1", max_queue=1, max_batch_size=1))
    with pytest.raises(Exception, match="not accepting"):
        engine.submit(_request())
    engine.start()
    first, second = engine.submit(_request()), engine.submit(_request())
    with pytest.raises(QueueFull):
        engine.submit(_request())
    first.cancel()
    engine.submit(_request())
    second.cancel()
    assert engine.prepare(_request()) is None


def test_body_carries_sampling_and_history() -> None:
    from service.engine.types import ChatTurn

    request = GenerationRequest(message="现在呢？", history=[ChatTurn("头痛", "多休息")],
                                params=SamplingParams(max_new_tokens=40, temperature=0.2, top_p=0.8, seed=7,
                                                      stop=("。",), min_new_tokens=5))
    body = build_body(request, "doctorglm-merged")
    assert body["messages"] == [{"role": "user", "content": "头痛"}, {"role": "assistant", "content": "多休息"},
                                {"role": "user", "content": "现在呢？"}]
    assert (body["model"], body["max_tokens"], body["temperature"], body["top_p"], body["seed"]) == \
        ("doctorglm-merged", 40, 0.2, 0.8, 7)
    assert body["stop"] == ["。"] and body["min_tokens"] == 5 and body["stream"] is True
    assert body["use_knowledge"] is False


def test_abort_all_ends_open_streams_with_a_cancelled_event() -> None:
    """The end of a drain (SIGTERM): streams still open get a clear end, not a hang."""
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(head + f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            await writer.drain()
            await asyncio.sleep(30)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def run() -> list:
        server = await asyncio.start_server(slow, "127.0.0.1", 0)
        engine = UpstreamEngine(_settings(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"))
        engine.start()
        handle = engine.submit(_request())
        await handle.open()
        events = []
        try:
            async for event in handle:
                events.append(event)
                if len(events) == 1:
                    await asyncio.to_thread(engine.abort_all, "the server is shutting down")
            return events
        finally:
            assert engine.stats() == {"active": 0, "queued": 0}
            await asyncio.to_thread(engine.stop)
            server.close()

    started = time.monotonic()
    events = asyncio.run(asyncio.wait_for(run(), 10))
    assert events[0].text == "x"
    assert events[-1].finish_reason == "cancelled" and events[-1].error == "the server is shutting down"
    assert time.monotonic() - started < 5


def test_an_upstream_that_breaks_mid_answer_is_503_on_every_route(cache_dir: Path, default_model_dir: Path,
                                                                   tmp_path: Path) -> None:
    """One chunk, then the stream ends without a finish_reason: an upstream failure (503, Retry-After), the
    same status whether the answer was streamed (the SSE error event) or collected (/chat, /v1 non-stream)."""
    import socketserver
    import threading

    body = 'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'

    class Truncated(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            self.wfile.write(_http(200, body, "text/event-stream"))

    fake = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Truncated)
    fake.daemon_threads = True
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    front = start_server(cache_dir, tmp_path, {"DOCTORGLM_ENGINE": "openai",
                                               "DOCTORGLM_UPSTREAM_URL": f"http://127.0.0.1:{fake.server_address[1]}/v1"})
    try:
        collected = [httpx.post(front.url + path, json=payload, timeout=30) for path, payload in (
            ("/chat", {"prompt": QUESTION}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": QUESTION}]}))]
        streamed = httpx.post(front.url + "/chat/stream", json={"prompt": QUESTION}, timeout=30)
    finally:
        front.stop()
        fake.shutdown()
    for response in collected:
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "upstream_unavailable" and response.headers.get("retry-after")
    name, payload = sse_events(streamed)[-1]
    assert name == "error" and payload["error"]["code"] == "upstream_unavailable"


def test_a_request_cancelled_while_it_connects_leaves_no_count_and_no_open_stream() -> None:
    chunk = {"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": "stop"}]}
    reply = _http(200, f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n", "text/event-stream")

    async def run() -> tuple[dict[str, int], bool]:
        async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            await asyncio.sleep(0.3)  # the client gives up before the upstream answers
            writer.write(reply)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(slow, "127.0.0.1", 0)
        engine = UpstreamEngine(_settings(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"))
        engine.start()
        try:
            handle = engine.submit(_request())
            opening = asyncio.ensure_future(handle.open())
            await asyncio.sleep(0.1)
            handle.cancel()
            await opening
            return engine.stats(), handle._response is not None and handle._response.is_closed
        finally:
            await asyncio.to_thread(engine.stop)
            server.close()

    stats, closed = asyncio.run(run())
    assert stats == {"active": 0, "queued": 0}
    assert closed  # the upstream's stream is not left open for nobody
