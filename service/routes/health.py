"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..errors import error_body
from ..runtime import Runtime
from .deps import get_runtime, request_id

router = APIRouter(tags=["operations"])


@router.api_route("/healthz", methods=["GET", "HEAD"])
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def live_model(runtime: Runtime) -> dict[str, Any]:
    """Which model, adapter, dtype and quantisation answer (an upstream engine knows only its model name)."""
    engine, adapter = runtime.engine, runtime.settings.adapter_path
    return {"model": engine.model_name if engine is not None else None,
            "adapter": adapter.name if adapter is not None else None,
            **(engine.model_summary() if engine is not None else {"dtype": None, "quantization": None})}


@router.api_route("/readyz", methods=["GET", "HEAD"],
                  responses={503: {"description": "Not ready: loading, failed to load, or draining"}})
async def readyz(request: Request, runtime: Runtime = Depends(get_runtime)) -> Any:
    body: dict[str, Any] = {
        "ready": runtime.ready,
        "draining": runtime.draining,
        "index": runtime.retriever is not None,
        "engine": runtime.engine.kind if runtime.engine is not None else None,
        **live_model(runtime),
        "diseases": runtime.retriever.size if runtime.retriever is not None else 0,
        "auth": runtime.keys.enabled,
    }
    if runtime.load_error:
        body["error"] = runtime.load_error
    if not runtime.ready:
        return JSONResponse({**error_body(503, "not_ready", "not ready", request_id(request)), **body},
                            503, {"Retry-After": "5"})
    return body


@router.api_route("/metrics", methods=["GET", "HEAD"], response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
                             "description": "Prometheus text exposition format"}})
async def metrics(runtime: Runtime = Depends(get_runtime)) -> Response:
    return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)
