"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..runtime import Runtime
from .deps import get_runtime

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Not ready: loading, failed to load, or draining"}})
async def readyz(runtime: Runtime = Depends(get_runtime)) -> Any:
    body: dict[str, Any] = {
        "ready": runtime.ready,
        "draining": runtime.draining,
        "index": runtime.retriever is not None,
        "engine": getattr(runtime.engine, "kind", None),
        "model": getattr(runtime.engine, "model_name", None),
        "diseases": runtime.retriever.size if runtime.retriever is not None else 0,
        "auth": runtime.keys.enabled,
    }
    if runtime.load_error:
        body["error"] = runtime.load_error
    if not runtime.ready:
        return JSONResponse({"error": {"code": "not_ready", "message": "not ready", "request_id": None}, **body},
                            503, {"Retry-After": "5"})
    return body


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
                             "description": "Prometheus text exposition format"}})
async def metrics(runtime: Runtime = Depends(get_runtime)) -> Response:
    m = runtime.metrics
    if runtime.engine is not None:
        m.queue_depth.set(runtime.engine.stats().get("queued", 0))
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
