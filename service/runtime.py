"""Everything a request needs, built once per app and kept on app.state.runtime."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from knowledge.search import Retriever
from llm.designer import PromptDesigner
from safety.triage import Triage

from .audit import AuditLog
from .auth import KeyChecker
from .engine.contract import Engine
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    metrics: Metrics
    keys: KeyChecker
    audit: AuditLog
    triage: Triage
    retriever: Retriever | None = None
    designer: PromptDesigner | None = None
    engine: Engine | None = None
    draining: bool = False
    open_streams: int = 0  # chat responses under way (queued or generating): what a drain waits for
    started_at: float = field(default_factory=time.time)
    load_error: str | None = None
    on_drained: Callable[[], None] | None = None  # set by the server: stop once the drain is over
    service_times: deque[float] = field(default_factory=lambda: deque(maxlen=32))
    _drain_asked: asyncio.Event | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    @property
    def ready(self) -> bool:
        return (not self.draining and self.designer is not None and self.engine is not None
                and self.engine.ready)

    def engine_stats(self) -> dict[str, int]:
        """Rows generating now (`active`), requests waiting for a row (`queued`), and the engine's other figures
        (the local engine's prompt-cache totals); zeros before the engine is loaded."""
        stats = self.engine.stats() if self.engine is not None else {}
        return {"active": 0, "queued": 0, **{key: int(value) for key, value in stats.items()}}

    def stream_opened(self) -> None:
        self.open_streams += 1

    def stream_closed(self) -> None:
        self.open_streams -= 1

    def record_service_time(self, seconds: float) -> None:
        """How long a finished answer held its generation row; the recent ones size Retry-After."""
        self.service_times.append(seconds)

    def retry_after_s(self) -> int:
        """When a refused request may find room: the queue ahead of it, served `max_batch_size` at a time,
        each taking the recent mean answer time (at least 1 s, at most 10 minutes)."""
        if not self.service_times:
            return 1
        mean = sum(self.service_times) / len(self.service_times)
        wait = self.engine_stats()["queued"] * mean / self.settings.max_batch_size
        return max(1, min(600, math.ceil(wait)))

    # --- shutdown drain: asked for by a signal handler, run in the app's lifespan ---

    def bind_loop(self) -> None:
        """Called in the lifespan, on the event loop the drain will run on."""
        self._loop = asyncio.get_running_loop()
        self._drain_asked = asyncio.Event()

    def request_drain(self) -> None:
        """Stop taking requests now (503, /readyz not ready) and start the drain; safe from a signal handler."""
        self.draining = True
        if self._loop is not None and self._drain_asked is not None:
            self._loop.call_soon_threadsafe(self._drain_asked.set)

    async def wait_for_drain_request(self) -> None:
        assert self._drain_asked is not None, "bind_loop first"
        await self._drain_asked.wait()

    async def drain(self) -> None:
        """Let open streams finish within DOCTORGLM_DRAIN_GRACE_S, then end the rest with an `error` event
        (and give those events up to 5 s to go out); then tell the server (on_drained)."""
        started = time.monotonic()
        log.info("draining", extra={"open_streams": self.open_streams, "grace_s": self.settings.drain_grace_s})
        await self._wait_streams(self.settings.drain_grace_s)
        left = self.open_streams
        if left > 0 and self.engine is not None:
            self.engine.abort_all("the server is shutting down")
            await self._wait_streams(5.0)
        log.info("drained", extra={"seconds": round(time.monotonic() - started, 3), "aborted_streams": left})
        if self.on_drained is not None:
            self.on_drained()

    async def _wait_streams(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self.open_streams > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)


def build_runtime(settings: Settings) -> Runtime:
    """Light parts only; the model and index are loaded by load_runtime (may take a while)."""
    triage = Triage.from_file(settings.red_flags_path, backstop=settings.triage_backstop,
                              backstop_path=settings.triage_backstop_path)
    runtime = Runtime(settings=settings, metrics=Metrics(), keys=KeyChecker(settings.keys()),
                      audit=AuditLog(settings.audit_log), triage=triage)
    runtime.metrics.watch_engine(runtime.engine_stats)
    return runtime


def load_runtime(runtime: Runtime, *, progress: bool = True) -> None:
    """Load the index and the model (blocking: run in a thread at start-up)."""
    s = runtime.settings
    started = time.perf_counter()
    retriever = Retriever.load_or_build(s.knowledge_path, s.cache_dir / "index", progress=progress,
                                        dialogues=s.dialogues_path)
    view = retriever.view
    log.info("dialogue view %s (DOCTORGLM_DIALOGUES_PATH=%s)", "off" if view is None else
             f"on: {view.folder}, {int(view.counts.sum())} training questions", s.dialogues_path)
    runtime.retriever = retriever
    runtime.designer = PromptDesigner(retriever, brief_chars=s.brief_chars, k=s.retrieval_k, triage=runtime.triage)
    log.info("knowledge index ready: %d diseases in %.1fs", retriever.size, time.perf_counter() - started)
    runtime.engine = make_engine(s, progress=progress)
    runtime.engine.start()
    log.info("engine ready (%s) after %.1fs", runtime.engine.kind, time.perf_counter() - started)


def make_engine(settings: Settings, *, progress: bool = True) -> Engine:
    if settings.engine == "openai":
        from .engine.upstream import UpstreamEngine

        return UpstreamEngine(settings)
    from llm.loading import load_model
    from llm.tiny_model import ensure_default_model

    from .engine.local import LocalEngine

    model_dir = settings.model_path or ensure_default_model(settings.cache_dir, progress=progress)
    loaded = load_model(model_dir, adapter_dir=settings.adapter_path, dtype=settings.dtype,
                        device=settings.device, quantization=settings.quantization,
                        trust_remote_code=settings.trust_remote_code, cache_dir=settings.cache_dir)
    return LocalEngine(loaded, max_batch_size=settings.max_batch_size, max_queue=settings.max_queue,
                       context_tokens=settings.context_tokens, repetition_guard=settings.repetition_guard,
                       prompt_cache_mb=settings.prompt_cache_mb, pack_cpu_linear=settings.pack_cpu_linear)
