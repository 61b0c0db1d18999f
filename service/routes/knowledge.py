"""GET /knowledge/search: the retrieval alone, for EHR integrations and debugging."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from pydantic import AfterValidator

from ..auth import require_api_key
from ..errors import APIError
from ..runtime import Runtime
from ..schemas import SearchResponse, error_responses, require_visible
from .deps import get_runtime

router = APIRouter(tags=["knowledge"])


Question = Annotated[str, Query(min_length=1, max_length=4000, pattern=r"\S"), AfterValidator(require_visible)]


@router.get("/knowledge/search", response_model=SearchResponse, responses=error_responses(401, 414, 422, 431, 503))
async def search(request: Request, q: Question,
                 k: Annotated[int, Query(ge=1, le=50)] = 5,
                 runtime: Runtime = Depends(get_runtime), key: str = Depends(require_api_key)) -> SearchResponse:
    request.state.audit_query = q  # in the audit record only with DOCTORGLM_AUDIT_TEXT=true
    if runtime.retriever is None:
        raise APIError(503, "not_ready", "the knowledge index is still loading", {"Retry-After": "5"})
    result = runtime.retriever.search(q, k=k)
    runtime.metrics.retrieval.observe(result.latency_ms / 1000)
    return SearchResponse(query=q, keywords=list(result.keywords), confident=bool(result.confident),
                          results=[hit.to_dict() for hit in result.hits], latency_ms=result.latency_ms)
