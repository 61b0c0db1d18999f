"""Pre-auth exhaustion and protocol errors, with raw sockets against the real server on 127.0.0.1 (issue 17,
defects 2 and 6): header size, slow headers, slow bodies, idle connections, the connection cap, and JSON
(not uvicorn's plain text) for requests h11 cannot parse. Every loop is bounded and stops by itself."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx
import pytest

from tests.api_support import proc_status
from tests.server import RunningServer, start_server

HEADER_TIMEOUT_S = 1.5
BODY_TIMEOUT_S = 1.5
MAX_CONNECTIONS = 12
MAX_HEADER_BYTES = 8192
MAX_URL_CHARS = 4096


@pytest.fixture(scope="module")
def guarded(cache_dir: Path, default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    logs = tmp_path_factory.mktemp("sockets")
    running = start_server(cache_dir, logs, {
        "DOCTORGLM_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S), "DOCTORGLM_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        "DOCTORGLM_MAX_CONNECTIONS": str(MAX_CONNECTIONS), "DOCTORGLM_MAX_HEADER_BYTES": str(MAX_HEADER_BYTES),
        "DOCTORGLM_MAX_URL_CHARS": str(MAX_URL_CHARS),
        "DOCTORGLM_AUDIT_LOG": str(logs / "audit.jsonl")})
    yield running
    running.stop()


def connect(server: RunningServer) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def read_response(sock: socket.socket, limit_s: float = 10) -> tuple[int | None, dict, float]:
    """(status, JSON body or {}, seconds until the server closed): None status when it closed silently."""
    started = time.monotonic()
    sock.settimeout(limit_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    elapsed = time.monotonic() - started
    if not data:
        return None, {}, elapsed
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"content-type: application/json" in head.lower(), head
    return status, json.loads(body), elapsed


def send_until_closed(sock: socket.socket, chunk: bytes, most: int) -> int:
    """Send `chunk` until the server stops reading or `most` bytes went out; returns the bytes sent."""
    sent = 0
    sock.settimeout(5)
    try:
        while sent < most:
            sock.sendall(chunk)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass
    return sent


def test_a_never_finished_header_is_431_and_memory_stays_flat(guarded: RunningServer) -> None:
    before = proc_status(guarded.proc.pid)["VmRSS"]
    sockets = [connect(guarded) for _ in range(4)]
    sent = []
    for sock in sockets:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        sent.append(send_until_closed(sock, b"a" * 65536, 8 * 1024 * 1024))
    for sock in sockets:
        status, body, _ = read_response(sock)
        sock.close()
        assert status == 431 and body["error"]["code"] == "headers_too_large"
    after = proc_status(guarded.proc.pid)["VmRSS"]
    print(f"4 sockets each sent up to 8 MB of header ({sent} bytes before the server stopped reading); "
          f"RSS {before} -> {after} kB")
    assert after - before < 32 * 1024
    assert all(n < 8 * 1024 * 1024 for n in sent)  # the server closed long before 8 MB


def test_a_whole_oversized_header_is_431(guarded: RunningServer) -> None:
    sock = connect(guarded)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES + 100) + b"\r\n\r\n")
    status, body, _ = read_response(sock)
    sock.close()
    assert status == 431 and body["error"]["code"] == "headers_too_large"


def test_slow_headers_are_cut_after_the_header_timeout(guarded: RunningServer) -> None:
    sockets = [connect(guarded) for _ in range(8)]
    for sock in sockets:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never the blank line
    results = [read_response(sock, limit_s=HEADER_TIMEOUT_S + 5) for sock in sockets]
    for sock in sockets:
        sock.close()
    print("slow headers:", [(status, round(seconds, 2)) for status, _, seconds in results])
    for status, body, seconds in results:
        assert status == 408 and body["error"]["code"] == "header_timeout"
        assert seconds < HEADER_TIMEOUT_S + 2


def test_a_byte_at_a_time_does_not_keep_a_header_alive(guarded: RunningServer) -> None:
    sock = connect(guarded)
    started = time.monotonic()
    sock.sendall(b"GET /healthz HTTP/1.1\r\n")
    sock.settimeout(0.3)
    closed = False
    while not closed and time.monotonic() - started < HEADER_TIMEOUT_S + 3:
        try:
            sock.sendall(b"X")
            sock.recv(65536)  # the 408, or b"" once closed
            closed = True
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            closed = True
    sock.close()
    assert closed and time.monotonic() - started < HEADER_TIMEOUT_S + 3


def test_an_idle_connection_is_closed_quietly(guarded: RunningServer) -> None:
    sock = connect(guarded)
    status, _, seconds = read_response(sock, limit_s=HEADER_TIMEOUT_S + 5)
    sock.close()
    assert status is None and seconds < HEADER_TIMEOUT_S + 2


def test_a_slow_body_is_cut_after_the_body_timeout(guarded: RunningServer) -> None:
    sock = connect(guarded)
    sock.sendall(b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
    status, body, seconds = read_response(sock, limit_s=BODY_TIMEOUT_S + 5)
    sock.close()
    print(f"Content-Length 100, 1 byte sent: {status} after {seconds:.2f}s")
    assert status == 408 and body["error"]["code"] == "body_timeout"
    assert seconds < BODY_TIMEOUT_S + 2


def test_connections_over_the_cap_are_refused_503_then_served_again(guarded: RunningServer) -> None:
    held = [connect(guarded) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)
        extra = connect(guarded)
        status, body, seconds = read_response(extra, limit_s=5)
        extra.close()
        assert status == 503 and body["error"]["code"] == "too_many_connections" and seconds < 2
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            if httpx.get(guarded.url + "/healthz", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    assert httpx.get(guarded.url + "/healthz", timeout=5).status_code == 200


@pytest.mark.parametrize("request_head", [
    b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    b"GARBAGE\r\n\r\n",
], ids=["letters", "negative", "two-lengths", "header-without-colon", "no-request-line"])
def test_unparsable_requests_get_a_json_400(guarded: RunningServer, request_head: bytes) -> None:
    sock = connect(guarded)
    sock.sendall(request_head)
    status, body, _ = read_response(sock)
    sock.close()
    assert status == 400 and body["error"]["code"] == "bad_request"


@pytest.mark.parametrize("length", [MAX_URL_CHARS + 100, 200_000], ids=["whole", "in-pieces"])
def test_an_over_long_url_is_a_json_414(guarded: RunningServer, length: int) -> None:
    sock = connect(guarded)
    sock.sendall(b"GET /healthz?q=" + b"a" * length + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    status, body, _ = read_response(sock)
    sock.close()
    assert status == 414 and body["error"]["code"] == "uri_too_long"


def test_the_server_still_answers_after_all_of_it(guarded: RunningServer) -> None:
    r = httpx.post(guarded.url + "/chat", json={"prompt": "头痛两天", "max_new_tokens": 2}, timeout=60)
    assert r.status_code == 200
    assert guarded.stop() == 0
