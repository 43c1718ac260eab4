"""POST /v1/search: retrieval and selection only, with every score (integrators, debugging)."""

from __future__ import annotations

from fastapi import APIRouter

from server.api_models import SearchRequest, SearchResponse
from server.auth import ChatAuth
from server.deps import ChatServiceDep, KBNameDep

router = APIRouter(tags=["search"], dependencies=[ChatAuth])


@router.post("/v1/search", response_model=SearchResponse)
async def search(request: SearchRequest, service: ChatServiceDep, kb: KBNameDep) -> SearchResponse:
    """Candidates (kept first, then dropped) with CLIP and relevancy scores and stage timings."""
    return await service.search(request, kb)
