"""Everything a request needs, built once per app and kept on app.state.runtime."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from knowledge.search import Retriever
from llm.designer import PromptDesigner
from safety.triage import Triage

from .audit import AuditLog
from .auth import KeyChecker
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
    engine: Any = None
    draining: bool = False
    active_streams: int = 0
    started_at: float = field(default_factory=time.time)
    load_error: str | None = None

    @property
    def ready(self) -> bool:
        return (not self.draining and self.designer is not None and self.engine is not None
                and bool(getattr(self.engine, "ready", False)))

    def stream_opened(self) -> None:
        self.active_streams += 1
        self.metrics.active_streams.set(self.active_streams)

    def stream_closed(self) -> None:
        self.active_streams -= 1
        self.metrics.active_streams.set(self.active_streams)

    async def wait_for_streams(self, grace_s: float) -> bool:
        """Wait until no stream is active or grace_s has passed; True when all finished."""
        deadline = time.monotonic() + grace_s
        while self.active_streams > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.active_streams == 0


def build_runtime(settings: Settings, *, progress: bool = True) -> Runtime:
    """Light parts only; the model and index are loaded by load_runtime (may take a while)."""
    triage = Triage.from_file(settings.red_flags_path, backstop=settings.triage_backstop)
    return Runtime(settings=settings, metrics=Metrics(), keys=KeyChecker(settings.keys()),
                   audit=AuditLog(settings.audit_log), triage=triage)


def load_runtime(runtime: Runtime, *, progress: bool = True) -> None:
    """Load the index and the model (blocking: run in a thread at start-up)."""
    s = runtime.settings
    started = time.perf_counter()
    retriever = Retriever.load_or_build(s.knowledge_path, s.cache_dir / "index", progress=progress)
    runtime.retriever = retriever
    runtime.designer = PromptDesigner(retriever, brief_chars=s.brief_chars, k=s.retrieval_k, triage=runtime.triage)
    log.info("knowledge index ready: %d diseases in %.1fs", retriever.size, time.perf_counter() - started)
    runtime.engine = make_engine(s, progress=progress)
    runtime.engine.start()
    log.info("engine ready (%s) after %.1fs", runtime.engine.kind, time.perf_counter() - started)


def make_engine(settings: Settings, *, progress: bool = True) -> Any:
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
                       context_tokens=settings.context_tokens, repetition_guard=settings.repetition_guard)
