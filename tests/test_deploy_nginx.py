"""Replicas behind nginx, for real: the shipped docker/nginx.conf (paths and addresses substituted) on
127.0.0.1 in front of two real service processes. Skips when nginx (Debian's nginx-light) is absent.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.server import REPO_ROOT, RunningServer, free_port, start_server

NGINX_CONF = REPO_ROOT / "docker" / "nginx.conf"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
QUESTION = "孩子发烧三天，咳嗽有痰，怎么办？"

pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx-light)")


def render_nginx_conf(template: str, workdir: Path, port: int, backends: list[str]) -> str:
    """The shipped config with files under workdir, listening on 127.0.0.1:port, proxying to backends."""
    conf = template
    conf = re.sub(r"^(\s*)pid\s+[^;]+;", rf"\1pid {workdir}/nginx.pid;", conf, count=1, flags=re.M)
    conf = re.sub(r"^(\s*)error_log\s+[^;]+;", rf"\1error_log {workdir}/error.log info;", conf, flags=re.M)
    conf = re.sub(r"^(\s*)access_log\s+\S+", rf"\1access_log {workdir}/access.log", conf, flags=re.M)
    conf = re.sub(r"^(\s*)(\w+_temp_path)\s+[^;]+;", rf"\1\2 {workdir}/\2;", conf, flags=re.M)
    conf, listens = re.subn(r"^(\s*)listen\s+8080;", rf"\1listen 127.0.0.1:{port};", conf, flags=re.M)
    assert listens == 1, "docker/nginx.conf must have exactly one `listen 8080;`"
    replicas = iter(backends)
    conf, servers = re.subn(r"server\s+replica-\d+:8000", lambda _: f"server {next(replicas)}", conf)
    assert servers == len(backends), f"docker/nginx.conf names {servers} replicas, the test runs {len(backends)}"
    if os.geteuid() == 0:  # workers as root too: they may need the private tmp dir
        conf = "user root root;\n" + conf
    return conf


def test_rendered_config_keeps_the_shipped_directives(tmp_path: Path) -> None:
    conf = render_nginx_conf(NGINX_CONF.read_text(encoding="utf-8"), tmp_path, 18080,
                             ["127.0.0.1:1", "127.0.0.1:2"])
    for directive in ("proxy_buffering off;", "proxy_next_upstream error timeout", "max_fails=2 fail_timeout=10s",
                      "proxy_read_timeout", "proxy_http_version 1.1;", "zone doctorglm"):
        assert directive in conf, directive
    assert "/tmp/nginx" not in conf and "/dev/std" not in conf and "replica-" not in conf


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited with {proc.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("nginx did not start listening")


def _audit_ids(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    return {json.loads(line).get("request_id") for line in path.read_text(encoding="utf-8").splitlines() if line}


def _chat(url: str, rid: str, tokens: int = 4) -> httpx.Response:
    return httpx.post(url + "/chat", json={"prompt": QUESTION, "max_new_tokens": tokens, "min_new_tokens": tokens},
                      headers={"X-Request-ID": rid}, timeout=30)


def test_two_replicas_behind_nginx(cache_dir: Path, default_model_dir: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "nginx"
    workdir.mkdir()
    servers: list[RunningServer] = []
    nginx: subprocess.Popen[bytes] | None = None
    try:
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(start_server, cache_dir, tmp_path / f"replica-{i}",
                                   {"DOCTORGLM_AUDIT_LOG": str(tmp_path / f"audit-{i}.jsonl")}, 120)
                       for i in range(2)]
            for future in futures:
                servers.append(future.result())
        port = free_port()
        conf = render_nginx_conf(NGINX_CONF.read_text(encoding="utf-8"), workdir, port,
                                 [s.url.removeprefix("http://") for s in servers])
        (workdir / "nginx.conf").write_text(conf, encoding="utf-8")
        command = [NGINX, "-p", str(workdir), "-e", str(workdir / "error.log"), "-c", str(workdir / "nginx.conf")]
        check = subprocess.run([*command, "-t"], capture_output=True, text=True, timeout=20)
        assert check.returncode == 0, check.stderr
        nginx = subprocess.Popen([*command, "-g", "daemon off;"], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        _wait_port(port, nginx)
        lb = f"http://127.0.0.1:{port}"

        # 1. Requests spread over both replicas (each replica's audit log names the request ids it served).
        ids = [f"lb-spread-{i}" for i in range(8)]
        for rid in ids:
            r = _chat(lb, rid)
            assert r.status_code == 200, r.text
            assert r.headers["x-request-id"] == rid and r.json()["references"]
        time.sleep(0.2)
        served = [_audit_ids(tmp_path / f"audit-{i}.jsonl") & set(ids) for i in range(2)]
        assert served[0] | served[1] == set(ids)
        assert len(served[0]) >= 2 and len(served[1]) >= 2, f"not spread: {[len(s) for s in served]}"

        # 2. SSE passes through unbuffered: deltas arrive one by one over time, not in one burst at the end.
        arrivals: list[float] = []
        reads = 0
        started = time.monotonic()
        with httpx.stream("POST", lb + "/chat/stream", timeout=30,
                          json={"prompt": QUESTION, "max_new_tokens": 300, "min_new_tokens": 300}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            for chunk in r.iter_raw():
                reads += 1
                now = time.monotonic()
                arrivals += [now] * chunk.count(b"event: delta")
                assert now - started < 30
        assert len(arrivals) >= 50, len(arrivals)
        assert arrivals[-1] - arrivals[0] > 0.1, "all deltas arrived at once: nginx buffered the stream"
        assert len(set(arrivals)) >= 10 and reads >= 10, f"deltas came in only {reads} reads"

        # 3. One replica dies: requests keep succeeding on the other.
        servers[0].proc.kill()
        servers[0].proc.wait(10)
        for i in range(6):
            t0 = time.monotonic()
            r = _chat(lb, f"lb-after-kill-{i}")
            assert r.status_code == 200, (i, r.status_code, r.text[:300])
            assert time.monotonic() - t0 < 10
        with httpx.stream("POST", lb + "/chat/stream", timeout=30,
                          json={"prompt": QUESTION, "max_new_tokens": 16, "min_new_tokens": 16}) as r:
            assert r.status_code == 200
            body = r.read().decode()
        assert "event: done" in body
        after = _audit_ids(tmp_path / "audit-1.jsonl")
        assert {f"lb-after-kill-{i}" for i in range(6)} <= after
    finally:
        if nginx is not None and nginx.poll() is None:
            nginx.send_signal(signal.SIGQUIT)
            try:
                nginx.wait(10)
            except subprocess.TimeoutExpired:
                nginx.kill()
                nginx.wait(5)
        for server in servers:
            server.stop(timeout=15)
