"""create_app(settings): builds the FastAPI app; no globals at import time."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse

from .conversation import audit_request
from .errors import install_error_handlers
from .middleware import RequestContextMiddleware
from .routes import chat, health, knowledge, openai_compat
from .runtime import Runtime, build_runtime, load_runtime
from .settings import Settings, check_settings

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).resolve().parent / "static"


def create_app(settings: Settings | None = None, *, runtime: Runtime | None = None, progress: bool = False) -> FastAPI:
    """The app; the model and index load in the background at start-up (/readyz says when)."""
    settings = settings or Settings()
    check_settings(settings)
    runtime = runtime or build_runtime(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = None
        if runtime.engine is None:
            loader = asyncio.create_task(asyncio.to_thread(_load, runtime, progress))
        try:
            yield
        finally:
            runtime.draining = True
            if loader is not None and not loader.done():
                await asyncio.wait([loader], timeout=1)
            if runtime.engine is not None:
                await asyncio.to_thread(runtime.engine.stop)
            runtime.audit.close()

    # strict_content_type=False: a body without Content-Type is read as JSON, as ChatGLM api.py clients
    # (requests.post(url, data=json.dumps(...))) send it.
    app = FastAPI(title="DoctorGLM service", version="0.1.0", lifespan=lifespan, strict_content_type=False,
                  description="Grounded, streaming medical dialogue. Answers are not a diagnosis.")
    app.state.runtime = runtime
    install_error_handlers(app)
    if settings.cors_list():
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_list(), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "x-api-key", "content-type", "x-request-id"],
                           expose_headers=["x-request-id"])
    app.add_middleware(RequestContextMiddleware, max_body_bytes=settings.max_body_bytes, metrics=runtime.metrics,
                       is_draining=lambda: runtime.draining,
                       known_paths=lambda: {getattr(r, "path", "") for r in app.routes},
                       on_finish=lambda state, route, status, elapsed: audit_request(runtime, state, route, status,
                                                                                     elapsed))
    for router in (chat.router, openai_compat.router, knowledge.router, health.router):
        app.include_router(router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = publish_limits(get_openapi(title=app.title, version=app.version,
                                                            description=app.description, routes=app.routes),
                                                settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/", include_in_schema=False)
    async def page() -> object:
        index = STATIC_DIR / "index.html"
        if index.is_file():
            return FileResponse(index, media_type="text/html; charset=utf-8")
        return JSONResponse({"service": "doctorglm", "docs": "/docs"})

    return app


def publish_limits(schema: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Put this deployment's limits (settings) into /openapi.json in place of the hard ceilings, so the
    published schema says what the server accepts."""
    limits = {
        ("ChatRequest", "prompt"): ("maxLength", settings.max_input_chars),
        ("ChatRequest", "history"): ("maxItems", settings.max_history_turns),
        ("ChatRequest", "max_new_tokens"): ("maximum", settings.max_new_tokens),
        ("ChatCompletionRequest", "max_tokens"): ("maximum", settings.max_new_tokens),
        ("ChatCompletionRequest", "max_completion_tokens"): ("maximum", settings.max_new_tokens),
    }
    models = schema.get("components", {}).get("schemas", {})
    for (model, field), (keyword, value) in limits.items():
        prop = models.get(model, {}).get("properties", {}).get(field)
        if prop is None:
            continue
        for part in [prop, *prop.get("anyOf", [])]:
            if keyword in part:
                part[keyword] = min(part[keyword], value)
    return schema


def _load(runtime: Runtime, progress: bool) -> None:
    try:
        load_runtime(runtime, progress=progress)
    except Exception as exc:  # noqa: BLE001 - reported on /readyz and in the log, the process stays up
        log.exception("loading failed")
        runtime.load_error = f"{type(exc).__name__}: {exc}"
