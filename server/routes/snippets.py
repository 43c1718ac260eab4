"""Snippets through the API: add (multipart), list, read, image/thumbnail, delete; and KB stats."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import JSONResponse, Response
from pydantic import Json

from retriever.types import SearchFilters
from server.api_models import DeleteResponse, SnippetCreated, SnippetInfo, SnippetList, StatsResponse
from server.auth import AdminAuth, ChatAuth, ChatMediaAuth
from server.deps import IngestionDep, KBNameDep, KnowledgeBaseDep, SettingsDep
from server.services.links import snippet_info

router = APIRouter(tags=["snippets"])
# Blobs are content-addressed: the bytes behind a snippet's image never change.
_IMAGE_CACHE = "private, max-age=86400"


@router.post("/v1/snippets", response_model=SnippetCreated, status_code=201, dependencies=[AdminAuth],
             responses={200: {"model": SnippetCreated, "description": "Identical snippet already stored."}})
async def add_snippet(
    kb_name: KBNameDep, ingestion: IngestionDep,
    image: Annotated[UploadFile | None, File(description="The snippet's image.")] = None,
    text: Annotated[str | None, Form(description="Text or caption.")] = None,
    source: Annotated[str, Form(max_length=1024)] = "",
    tags: Annotated[list[str] | None, Form()] = None,
    page: Annotated[int | None, Form(ge=0, le=1_000_000, description="Page number (PDF pages).")] = None,
    extra: Annotated[
        Json[dict[str, Any]] | None, Form(max_length=65536, description="JSON object kept in the payload.")
    ] = None,
) -> Any:
    """Embed and store one snippet (image, text or both) through the ingestion pipeline."""
    body = await ingestion.add_snippet(
        kb_name, image=await image.read() if image is not None else None,
        filename=image.filename if image is not None else None, text=text, source=source, tags=tags or (),
        page=page, extra=extra,
    )
    return JSONResponse(body.model_dump(), status_code=201 if body.created else 200)


@router.get("/v1/snippets", response_model=SnippetList, dependencies=[ChatAuth])
async def list_snippets(
    kb: KnowledgeBaseDep, kb_name: KBNameDep, settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[str | None, Query(max_length=100, description="next_offset of the previous page")] = None,
    source: Annotated[str | None, Query(max_length=1024)] = None,
) -> SnippetList:
    """A page of snippets (for the KB page); follow ``next_offset`` for the next one."""
    filters = SearchFilters(source=source) if source else None
    points, next_offset = await kb.list_snippets(limit, offset or None, filters)
    return SnippetList(
        items=[snippet_info(p.id, p.payload, settings.public_url, kb_name) for p in points],
        next_offset=next_offset,
    )


@router.get("/v1/snippets/{snippet_id}", response_model=SnippetInfo, dependencies=[ChatAuth])
async def get_snippet(snippet_id: str, kb: KnowledgeBaseDep, kb_name: KBNameDep, settings: SettingsDep) -> SnippetInfo:
    point = await kb.get(snippet_id)
    return snippet_info(point.id, point.payload, settings.public_url, kb_name)


@router.get("/v1/snippets/{snippet_id}/image", dependencies=[ChatMediaAuth],
            responses={200: {"content": {"image/*": {}}}})
async def get_snippet_image(snippet_id: str, kb: KnowledgeBaseDep) -> Response:
    data, media_type = await kb.image_bytes(snippet_id)
    return Response(data, media_type=media_type, headers={"Cache-Control": _IMAGE_CACHE})


@router.get("/v1/snippets/{snippet_id}/thumbnail", dependencies=[ChatMediaAuth],
            responses={200: {"content": {"image/jpeg": {}}}})
async def get_snippet_thumbnail(snippet_id: str, kb: KnowledgeBaseDep) -> Response:
    data, media_type = await kb.image_bytes(snippet_id, thumbnail=True)
    return Response(data, media_type=media_type, headers={"Cache-Control": _IMAGE_CACHE})


@router.delete("/v1/snippets/{snippet_id}", response_model=DeleteResponse, dependencies=[AdminAuth])
async def delete_snippet(snippet_id: str, kb: KnowledgeBaseDep) -> DeleteResponse:
    await kb.delete(snippet_id)
    return DeleteResponse(id=snippet_id, deleted=True)


@router.get("/v1/stats", response_model=StatsResponse, dependencies=[AdminAuth])
async def stats(kb: KnowledgeBaseDep) -> StatsResponse:
    """Counts by kind and source, embedder identity, store and blob backends."""
    return StatsResponse.model_validate(await kb.stats())
