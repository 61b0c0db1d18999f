"""create_app(settings): builds the FastAPI app; no globals at import time."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse

from .chat_audit import audit_request
from .errors import install_error_handlers
from .middleware import RequestContextMiddleware, RequestLimits
from .routes import chat, completions, health, knowledge, openai_compat
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
        runtime.bind_loop()
        # The one shutdown drain: a signal handler asks (runtime.request_drain), this task runs it.
        drainer = asyncio.create_task(_drain_when_asked(runtime))
        try:
            yield
        finally:
            runtime.draining = True
            drainer.cancel()
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
    # No redirects to the slash-less path: Starlette builds them from the Host header (an open redirect,
    # answered before the key check). /chat/ is a 404 like any unknown path.
    app.router.redirect_slashes = False
    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware, limits=RequestLimits.from_settings(settings),
                       metrics=runtime.metrics, keys=runtime.keys, is_draining=lambda: runtime.draining,
                       known_paths=lambda: route_paths(app),
                       on_finish=lambda state, route, status, elapsed: audit_request(runtime, state, route, status,
                                                                                     elapsed))
    if settings.cors_list():  # outermost, so that refusals (401, 413, ...) carry the CORS headers too
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_list(), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "x-api-key", "content-type", "x-request-id"],
                           expose_headers=["x-request-id"])
    for router in (chat.router, openai_compat.router, completions.router, knowledge.router, health.router):
        app.include_router(router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = publish_limits(get_openapi(title=app.title, version=app.version,
                                                            description=app.description, routes=app.routes),
                                                settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    index = STATIC_DIR / "index.html"
    page_headers = {"Content-Security-Policy": page_policy(index.read_text(encoding="utf-8"))} \
        if index.is_file() else {}

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page() -> object:
        if index.is_file():
            return FileResponse(index, media_type="text/html; charset=utf-8", headers=page_headers)
        return JSONResponse({"service": "doctorglm", "docs": "/docs"})

    return app


def page_policy(html: str) -> str:
    """The chat page's Content-Security-Policy: its own inline script and style (by hash) and requests to
    this origin only; nothing from elsewhere, no framing, no plugins."""

    def hashes(tag: str) -> str:
        bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        found = ["'sha256-" + base64.b64encode(hashlib.sha256(b.encode()).digest()).decode() + "'" for b in bodies]
        return " ".join(found) or "'none'"

    return (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
            "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def route_paths(app: FastAPI) -> set[str]:
    """Every route's path, also those of included routers (FastAPI keeps those inside an included-router
    object): the metrics and audit label of a request refused before routing."""
    if not hasattr(app.state, "route_paths"):
        paths: set[str] = set()
        pending = list(app.routes)
        while pending:
            route = pending.pop()
            if getattr(route, "path", ""):
                paths.add(route.path)
            original = getattr(route, "original_router", None)
            pending.extend(getattr(original, "routes", ()))
        app.state.route_paths = paths
    return app.state.route_paths


async def _drain_when_asked(runtime: Runtime) -> None:
    await runtime.wait_for_drain_request()
    await runtime.drain()


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
    prompt = models.get("ChatRequest", {}).get("properties", {}).get("prompt")
    if prompt is not None:
        prompt["description"] = prompt_limit_text(settings)
    for (model, field), (keyword, value) in limits.items():
        prop = models.get(model, {}).get("properties", {}).get(field)
        if prop is None:
            continue
        for part in [prop, *prop.get("anyOf", [])]:
            if keyword in part:
                part[keyword] = min(part[keyword], value)
    return schema


def prompt_limit_text(settings: Settings) -> str:
    """The real limits of a question, as the schema and docs/api.md state them."""
    return (f"The patient's question: at most {settings.max_input_chars} characters (DOCTORGLM_MAX_INPUT_CHARS). "
            f"It must also fit in tokens: the question with its disease brief and history may use "
            f"DOCTORGLM_CONTEXT_TOKENS ({settings.context_tokens}) minus max_new_tokens tokens; older history "
            "turns are dropped first, and a question too long on its own is a 422 prompt_too_long (shorten it "
            "or ask for fewer max_new_tokens). How many characters make a token depends on the model's "
            "tokenizer, so a question under the character limit can still be too long.")


def _load(runtime: Runtime, progress: bool) -> None:
    try:
        load_runtime(runtime, progress=progress)
    except Exception as exc:  # noqa: BLE001 - reported on /readyz and in the log, the process stays up
        log.exception("loading failed")
        runtime.load_error = f"{type(exc).__name__}: {exc}"
