"""API keys, audit with text, CORS configured, 429 under a burst, start-up refusals — real servers."""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.api_support import QUESTION, proc_status, read_jsonl
from tests.server import REPO_ROOT, RunningServer, free_port, start_server

KEY = "sk-test-7f3a9c1e5b2d4f60a8c9"
OTHER_KEY = "sk-file-key-0123456789abcdef"
ORIGIN = "https://ehr.hospital.example"
QUEUE, BATCH = 2, 1  # capacity: 2 waiting + 1 running


@pytest.fixture(scope="module")
def keyed(cache_dir: Path, default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    logs = tmp_path_factory.mktemp("keyed")
    keys_file = logs / "keys.txt"
    keys_file.write_text(f"# one key a line\n{OTHER_KEY}\n", encoding="utf-8")
    running = start_server(cache_dir, logs, {
        "DOCTORGLM_API_KEYS": KEY, "DOCTORGLM_API_KEYS_FILE": str(keys_file),
        "DOCTORGLM_AUDIT_LOG": str(logs / "audit.jsonl"), "DOCTORGLM_AUDIT_TEXT": "true",
        "DOCTORGLM_CORS_ORIGINS": ORIGIN, "DOCTORGLM_MAX_QUEUE": str(QUEUE),
        "DOCTORGLM_MAX_BATCH_SIZE": str(BATCH)})
    running.audit_path = logs / "audit.jsonl"  # type: ignore[attr-defined]
    yield running
    running.stop()


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_missing_or_wrong_key_is_401_json_on_both_headers(keyed: RunningServer) -> None:
    body = {"prompt": QUESTION, "max_new_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer nope"}, {"X-API-Key": "nope"}, {"Authorization": KEY},
                    {"Authorization": f"Basic {KEY}"}, {"X-API-Key": KEY[:-1]}):
        r = httpx.post(keyed.url + "/chat", json=body, headers=headers, timeout=30)
        assert r.status_code == 401, headers
        assert r.json()["error"]["code"] == "unauthorized" and r.headers["www-authenticate"] == "Bearer"
    for path in ("/v1/models", "/knowledge/search?q=发烧"):
        assert httpx.get(keyed.url + path).status_code == 401
    assert httpx.get(keyed.url + "/healthz").status_code == 200  # probes need no key
    for headers in (auth(), {"X-API-Key": KEY}, auth(OTHER_KEY), {"authorization": f"bearer {KEY}"}):
        assert httpx.post(keyed.url + "/chat", json=body, headers=headers, timeout=60).status_code == 200, headers


def test_openai_client_with_the_key(keyed: RunningServer) -> None:
    client = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    done = client.chat.completions.create(model="doctorglm", messages=[{"role": "user", "content": QUESTION}],
                                          max_tokens=3)
    assert done.choices[0].message.content
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_cors_configured_origin_only(keyed: RunningServer) -> None:
    preflight = httpx.options(keyed.url + "/chat", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                                                             "Access-Control-Request-Headers": "authorization"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.get(keyed.url + "/healthz", headers={"Origin": ORIGIN})
    assert r.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.get(keyed.url + "/healthz", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


async def _burst(url: str, count: int) -> collections.Counter[tuple[int, str | None]]:
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=count)) as client:
        async def one(i: int) -> tuple[int, str | None]:
            body = {"prompt": f"{QUESTION} {i}", "max_new_tokens": 24, "min_new_tokens": 24}
            r = await client.post(url + "/chat", json=body, headers=auth())
            return r.status_code, r.headers.get("retry-after")

        return collections.Counter(await asyncio.gather(*(one(i) for i in range(count))))


def test_burst_of_ten_times_capacity_gets_only_200_and_429(keyed: RunningServer) -> None:
    capacity = QUEUE + BATCH
    asyncio.run(_burst(keyed.url, capacity))  # warm-up: first-time allocations are not growth
    before = proc_status(keyed.proc.pid)
    seen: collections.Counter[tuple[int, str | None]] = collections.Counter()
    started = time.monotonic()
    for _ in range(3):
        seen += asyncio.run(_burst(keyed.url, 10 * capacity))
    after = proc_status(keyed.proc.pid)
    statuses = {status for status, _ in seen}
    print(f"burst: 3 x {10 * capacity} requests in {time.monotonic() - started:.1f}s: {dict(seen)}; "
          f"RSS {before['VmRSS']} -> {after['VmRSS']} kB, threads {before['Threads']} -> {after['Threads']}")
    assert statuses == {200, 429}
    assert all(retry is not None and int(retry) >= 1 for status, retry in seen if status == 429)  # on every 429
    assert after["VmRSS"] - before["VmRSS"] < 64 * 1024, (before, after)
    assert httpx.get(keyed.url + "/readyz").status_code == 200
    assert httpx.post(keyed.url + "/chat", json={"prompt": QUESTION, "max_new_tokens": 2}, headers=auth(),
                      timeout=60).status_code == 200


def test_keys_never_in_logs_or_audit_and_audit_has_text(keyed: RunningServer) -> None:
    rid = f"keyed-{time.time_ns()}"
    ok = httpx.post(keyed.url + "/chat", json={"prompt": QUESTION, "max_new_tokens": 3},
                    headers={**auth(), "X-Request-ID": rid}, timeout=60)
    denied = httpx.post(keyed.url + "/chat", json={"prompt": QUESTION}, headers={"X-API-Key": KEY + "x",
                                                                                 "X-Request-ID": rid + "-401"})
    assert (ok.status_code, denied.status_code) == (200, 401)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        records = {r["request_id"]: r for r in read_jsonl(keyed.audit_path)}
        if rid in records and rid + "-401" in records:
            break
        time.sleep(0.1)
    record = records[rid]
    assert record["key_id"].startswith("key-") and record["status"] == 200
    assert record["question"] == QUESTION and record["answer"]  # DOCTORGLM_AUDIT_TEXT=true
    assert records[rid + "-401"]["status"] == 401 and records[rid + "-401"]["key_id"] is None
    assert len({r["key_id"] for r in records.values() if r.get("key_id")}) == 2  # both keys, told apart
    for text in (keyed.log(), keyed.audit_path.read_text(encoding="utf-8")):
        assert KEY not in text and OTHER_KEY not in text and KEY[:12] not in text


def test_audit_is_complete_after_shutdown(keyed: RunningServer) -> None:
    """Runs last in this module: every request made is in the audit log once the process has exited."""
    rids = [f"last-{i}-{time.time_ns()}" for i in range(5)]
    for rid in rids:
        httpx.post(keyed.url + "/chat", json={"prompt": QUESTION, "max_new_tokens": 2},
                   headers={**auth(), "X-Request-ID": rid}, timeout=60)
    assert keyed.stop() == 0
    records = read_jsonl(keyed.audit_path)
    ids = [r["request_id"] for r in records]
    assert all(ids.count(rid) == 1 for rid in rids)


def _run_service(env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "DOCTORGLM_API_KEYS": "", "DOCTORGLM_API_KEYS_FILE": "",
            "DOCTORGLM_ALLOW_ANONYMOUS": "false", **env}
    return subprocess.run([sys.executable, "-m", "service"], cwd=REPO_ROOT, env=full, capture_output=True,
                          text=True, timeout=timeout)


def test_public_bind_without_keys_is_refused() -> None:
    done = _run_service({"DOCTORGLM_HOST": "0.0.0.0", "DOCTORGLM_PORT": str(free_port())})
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "DOCTORGLM_API_KEYS" in lines[0] and "Traceback" not in done.stderr


@pytest.mark.parametrize("host", ["", "0.0.0.0", "::"])
def test_every_interface_counts_as_public(host: str) -> None:
    from service.settings import Settings, SettingsError, check_settings

    settings = Settings(host=host, api_keys="", api_keys_file=None, allow_anonymous=False)
    assert not settings.is_loopback()  # bind(("", port)) listens on every interface, like 0.0.0.0
    with pytest.raises(SettingsError, match="DOCTORGLM_API_KEYS"):
        check_settings(settings)


def test_port_in_use_is_one_line_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = _run_service({"DOCTORGLM_HOST": "127.0.0.1", "DOCTORGLM_PORT": str(port)})
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "already in use" in lines[0] and "Traceback" not in done.stderr
