"""Faults against the real server: clients that go away, an engine that raises, SIGTERM during streams."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api_support import QUESTION, build_short_window_model, gauge, proc_status, read_jsonl, sse_events
from tests.server import RunningServer, start_server

LONG = {"prompt": QUESTION, "max_new_tokens": 400, "min_new_tokens": 400}


async def _abort_after_first_delta(url: str, count: int) -> int:
    """Open `count` streams at once, read until the first delta, then drop the connection."""
    async with httpx.AsyncClient(timeout=60) as client:
        async def one() -> int:
            async with client.stream("POST", url + "/chat/stream", json=LONG) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("event: delta"):
                        return 1
            return 0

        return sum(await asyncio.gather(*(one() for _ in range(count))))


def test_aborted_streams_free_their_slots(server: RunningServer) -> None:
    asyncio.run(_abort_after_first_delta(server.url, 10))  # warm-up
    time.sleep(0.5)
    before = proc_status(server.proc.pid)
    aborted = 0
    for _ in range(10):
        aborted += asyncio.run(_abort_after_first_delta(server.url, 10))
    last_abort = time.monotonic()
    while gauge(server.url, "doctorglm_active_streams") > 0 and time.monotonic() - last_abort < 5:
        time.sleep(0.02)
    back_to_zero_s = time.monotonic() - last_abort
    after = proc_status(server.proc.pid)
    print(f"aborted {aborted} streams: active streams 0 after {back_to_zero_s:.2f}s; "
          f"threads {before['Threads']} -> {after['Threads']}, RSS {before['VmRSS']} -> {after['VmRSS']} kB")
    assert aborted == 100
    assert back_to_zero_s < 1.0
    assert after["Threads"] <= before["Threads"]
    assert gauge(server.url, "doctorglm_queue_depth") == 0
    r = httpx.post(server.url + "/chat", json={"prompt": QUESTION, "max_new_tokens": 4}, timeout=60)
    assert r.status_code == 200  # the engine is free again


# ----- a server whose model raises for long prompts, then drains on SIGTERM -----

WINDOW = 1024
LONG_QUESTION = "发烧咳嗽头痛乏力，" * 450  # 4,050 characters: far more than 1,024 tokens


@pytest.fixture(scope="module")
def fragile(cache_dir: Path, default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The service on a model with a 1,024-position window while DOCTORGLM_CONTEXT_TOKENS says 4,096."""
    model = build_short_window_model(default_model_dir, cache_dir / f"gpt2-window-{WINDOW}", WINDOW)
    logs = tmp_path_factory.mktemp("fragile")
    running = start_server(cache_dir, logs, {
        "DOCTORGLM_MODEL_PATH": str(model), "DOCTORGLM_CONTEXT_TOKENS": "4096",
        "DOCTORGLM_MAX_INPUT_CHARS": "5000", "DOCTORGLM_MAX_NEW_TOKENS": "1000",
        "DOCTORGLM_DRAIN_GRACE_S": "1.5", "DOCTORGLM_AUDIT_LOG": str(logs / "audit.jsonl")})
    running.audit_path = logs / "audit.jsonl"  # type: ignore[attr-defined]
    yield running
    running.stop()


def test_engine_failure_fails_that_request_only(fragile: RunningServer) -> None:
    short = {"prompt": "发烧", "max_new_tokens": 8, "use_knowledge": False}
    boom = {"prompt": LONG_QUESTION, "max_new_tokens": 8}
    r = httpx.post(fragile.url + "/chat", json=boom, timeout=60)
    assert r.status_code == 500 and r.json()["error"]["code"] == "generation_failed"
    assert httpx.post(fragile.url + "/chat", json=short, timeout=60).status_code == 200
    with httpx.stream("POST", fragile.url + "/chat/stream", json=boom, timeout=60) as s:
        events = sse_events(s)
    assert [name for name, _ in events] == ["meta", "error"]
    assert events[-1][1]["error"]["code"] == "generation_failed"
    with httpx.stream("POST", fragile.url + "/v1/chat/completions", timeout=60,
                      json={"messages": [{"role": "user", "content": LONG_QUESTION}], "stream": True}) as s:
        events = sse_events(s)
    assert events[-2][0] == "error" and events[-2][1]["error"]["code"] == "generation_failed"
    assert events[-1] == ("message", "[DONE]")
    assert httpx.post(fragile.url + "/chat", json=short, timeout=60).status_code == 200
    assert httpx.get(fragile.url + "/readyz").status_code == 200


def _stream_into(url: str, body: dict[str, Any], out: list[tuple[str, Any]], first: threading.Event) -> None:
    try:
        with httpx.stream("POST", url + "/chat/stream", json=body, timeout=60) as r:
            name = "message"
            for line in r.iter_lines():
                if line.startswith("event:"):
                    name = line[6:].strip()
                elif line.startswith("data:"):
                    out.append((name, json.loads(line[5:])))
                    if name == "delta":
                        first.set()
    except httpx.HTTPError as exc:
        out.append(("transport", str(exc)))
    finally:
        first.set()


def test_sigterm_drains_streams_then_exits_zero(fragile: RunningServer) -> None:
    """Runs last in this module. Short streams finish; long ones end with an error event after the grace."""
    short = {"prompt": "发烧", "max_new_tokens": 30, "min_new_tokens": 30, "use_knowledge": False}
    long = {"prompt": "咳嗽", "max_new_tokens": 990, "min_new_tokens": 990, "use_knowledge": False,
            "repetition_penalty": 1.0}
    plans = [short, short, long, long]
    results: list[list[tuple[str, Any]]] = [[] for _ in plans]
    firsts = [threading.Event() for _ in plans]
    threads = [threading.Thread(target=_stream_into, args=(fragile.url, body, results[i], firsts[i]))
               for i, body in enumerate(plans)]
    for thread in threads:
        thread.start()
    for event in firsts:
        assert event.wait(30)
    sent = time.monotonic()
    fragile.proc.send_signal(signal.SIGTERM)
    time.sleep(0.1)
    ready = httpx.get(fragile.url + "/readyz", timeout=5)
    readyz_s = time.monotonic() - sent
    new = httpx.post(fragile.url + "/chat", json=short, timeout=5)
    assert ready.status_code == 503 and ready.json()["draining"] is True
    assert new.status_code == 503 and new.json()["error"]["code"] == "draining" and new.headers["retry-after"]
    code = fragile.proc.wait(30)
    exit_s = time.monotonic() - sent
    for thread in threads:
        thread.join(10)
    print(f"drain: readyz 503 after {readyz_s:.2f}s, exit {code} after {exit_s:.2f}s (grace 1.5s); "
          f"endings {[r[-1][0] for r in results]}")
    assert code == 0
    assert 1.5 <= exit_s < 10
    for events in results[:2]:
        assert events[-1][0] == "done"
    for events in results[2:]:
        assert events[-1][0] == "error" and events[-1][1]["error"]["code"] == "shutting_down"
        assert sum(1 for name, _ in events if name == "delta") >= 1
    records = read_jsonl(fragile.audit_path)  # flushed before exit
    assert sum(1 for r in records if r.get("status") == 503 and r.get("finish_reason") == "cancelled") == 2
    assert sum(1 for r in records if r.get("error") == "draining") == 1
