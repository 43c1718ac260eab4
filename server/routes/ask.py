"""POST /v1/ask: a question (and optional images) as a multipart form; the answer with its sources."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import StreamingResponse

from server.api_models import AskResponse, RetrievalFilters, RetrievalOptions, Scorer
from server.auth import ChatAuth
from server.deps import ChatServiceDep, MetricsDep, SettingsDep
from server.limits import check_upload_count
from server.routes.streaming import sse_response

router = APIRouter(tags=["chat"], dependencies=[ChatAuth])


@router.post("/v1/ask", response_model=AskResponse)
async def ask(
    service: ChatServiceDep, metrics: MetricsDep, settings: SettingsDep,
    question: Annotated[str, Form(description="The question.")] = "",
    image: Annotated[list[UploadFile] | None, File(description="Optional image file(s).")] = None,
    k: Annotated[int | None, Form(ge=1)] = None,
    threshold: Annotated[float | None, Form(ge=0, le=1)] = None,
    margin: Annotated[float | None, Form(ge=0, le=1)] = None,
    min_k: Annotated[int | None, Form(ge=0)] = None,
    pool: Annotated[int | None, Form(ge=1)] = None,
    scorer: Annotated[Scorer | None, Form()] = None,
    source: Annotated[str | None, Form(max_length=1024)] = None,
    tags: Annotated[list[str] | None, Form()] = None,
    max_tokens: Annotated[int | None, Form(ge=1)] = None,
    temperature: Annotated[float | None, Form(ge=0, le=2)] = None,
    stream: Annotated[bool, Form()] = False,
) -> AskResponse | StreamingResponse:
    """Retrieve, select and answer; ``stream=true`` gives the same SSE chunks as chat completions."""
    files = image or []
    check_upload_count(settings, len(files), param="image")
    uploads = [(await f.read(), f.filename) for f in files]
    filters = RetrievalFilters(source=source, tags=tags) if (source or tags) else None
    options = RetrievalOptions(k=k, threshold=threshold, margin=margin, min_k=min_k, pool=pool, scorer=scorer,
                               filters=filters)
    prepared = await service.prepare_ask(question, uploads, options, max_tokens=max_tokens,
                                         temperature=temperature)
    if stream:
        return sse_response(await service.open_stream(prepared), metrics)
    result = await service.complete(prepared)
    choice = result.choices[0]
    return AskResponse(
        answer=choice.message.content or "", model=result.model, sources=result.sources, timings=result.timings,
        usage=result.usage.model_dump() if result.usage else None, degraded=result.degraded,
        finish_reason=choice.finish_reason,
    )
