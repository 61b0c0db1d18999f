"""Audit log: one JSON line per request, written by a background thread so the event loop never blocks."""

from __future__ import annotations

import json
import logging
import queue
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
_STOP = object()


class AuditLog:
    """Append-only JSONL writer. close() drains the queue, so nothing is lost on shutdown."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
            self._thread.start()

    def write(self, record: dict[str, Any]) -> None:
        if self._thread is not None:
            self._queue.put(record)

    def close(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        assert self.path is not None
        with self.path.open("a", encoding="utf-8") as handle:
            while True:
                record = self._queue.get()
                if record is _STOP:
                    handle.flush()
                    return
                try:
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                    if self._queue.empty():
                        handle.flush()
                except (OSError, TypeError, ValueError):
                    log.exception("audit write failed")
