"""GET and POST /knowledge/search: the retrieval alone, for EHR integrations and debugging. POST takes a
structured patient record beside (or instead of) the free text."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from pydantic import AfterValidator

from knowledge.patient import PatientContext

from ..auth import require_api_key
from ..errors import APIError
from ..runtime import Runtime
from ..schemas import SearchRequest, SearchResponse, error_responses, require_visible
from .deps import get_runtime

router = APIRouter(tags=["knowledge"])


Question = Annotated[str, Query(min_length=1, max_length=4000, pattern=r"\S"), AfterValidator(require_visible)]


@router.get("/knowledge/search", response_model=SearchResponse, responses=error_responses(401, 414, 422, 431, 503))
async def search(request: Request, q: Question,
                 k: Annotated[int, Query(ge=1, le=50)] = 5,
                 runtime: Runtime = Depends(get_runtime), key: str = Depends(require_api_key)) -> SearchResponse:
    request.state.audit_query = q  # in the audit record only with DOCTORGLM_AUDIT_TEXT=true
    return _search(runtime, q, k, None)


@router.post("/knowledge/search", response_model=SearchResponse,
             responses=error_responses(400, 401, 413, 415, 422, 431, 503))
async def search_record(request: Request, body: SearchRequest, runtime: Runtime = Depends(get_runtime),
                        key: str = Depends(require_api_key)) -> SearchResponse:
    request.state.audit_query = body.q
    return _search(runtime, body.q.strip(), body.k, body.patient.to_context() if body.patient else None)


def _search(runtime: Runtime, q: str, k: int, patient: PatientContext | None) -> SearchResponse:
    if runtime.retriever is None:
        raise APIError(503, "not_ready", "the knowledge index is still loading", {"Retry-After": "5"})
    result = runtime.retriever.search(q, k=k, patient=patient)
    runtime.metrics.retrieval.observe(result.latency_ms / 1000)
    return SearchResponse(query=q, keywords=list(result.keywords), confident=bool(result.confident),
                          results=[hit.to_dict() for hit in result.hits], latency_ms=result.latency_ms,
                          negated=list(result.negated), patient=patient.used() if patient is not None else {})
