"""`python -m service`: check settings and port, build/load what is needed (with progress), serve."""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

log = logging.getLogger("service")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def main() -> int:
    import uvicorn

    from .app import create_app
    from .logging_setup import configure_logging
    from .protocol import guarded_protocol
    from .runtime import build_runtime, load_runtime
    from .settings import Settings, SettingsError, check_settings

    try:
        settings = Settings()
        check_settings(settings)
    except (SettingsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:
        sock = _bind(settings.host, settings.port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            print(f"error: port {settings.port} on {settings.host} is already in use: stop the other process "
                  "or set DOCTORGLM_PORT to a free port", file=sys.stderr)
        else:
            print(f"error: cannot listen on {settings.host}:{settings.port}: {exc.strerror}", file=sys.stderr)
        return 1
    started = time.perf_counter()
    try:
        runtime = build_runtime(settings)
        load_runtime(runtime, progress=True)
    except Exception as exc:  # noqa: BLE001 - one clear line, not a traceback
        print(f"error: could not load the service: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    app = create_app(settings, runtime=runtime)

    class DrainingServer(uvicorn.Server):
        """SIGTERM/SIGINT drain: /readyz and new requests answer 503 at once while the server keeps
        listening; the app's lifespan runs the drain (in-flight streams may finish within
        DOCTORGLM_DRAIN_GRACE_S, then the engine ends the rest with an `error` event); then uvicorn shuts
        down and the process exits 0. A second SIGINT (or SIGTERM) stops at once."""

        def handle_exit(self, sig: int, frame: object) -> None:
            if not runtime.draining:
                log.info("drain requested", extra={"signal": signal.Signals(sig).name})
                runtime.request_drain()
                return
            # Not super().handle_exit: uvicorn would re-raise the signal after shutdown (exit status -15).
            if self.should_exit:
                self.force_exit = True
            self.should_exit = True

    # h11 (not httptools) for its limit on the request head; the protocol adds the header timer, the
    # connection cap and JSON refusals (service/protocol.py).
    config = uvicorn.Config(app, log_config=None, timeout_graceful_shutdown=int(settings.drain_grace_s) + 5,
                            access_log=False, http=guarded_protocol(settings),
                            h11_max_incomplete_event_size=settings.max_header_bytes)
    server = DrainingServer(config)

    def drained() -> None:
        server.should_exit = True

    runtime.on_drained = drained
    url = f"http://{settings.host}:{sock.getsockname()[1]}"
    example = '{"prompt":"孩子发烧三天，咳嗽有痰，怎么办？"}'
    print(f"DoctorGLM service ready in {time.perf_counter() - started:.1f}s on {url}\n"
          f"  try: curl -s {url}/chat -H 'content-type: application/json' -d '{example}'\n"
          f"  or open {url}/ in a browser", file=sys.stderr, flush=True)
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
