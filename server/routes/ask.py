"""POST /v1/ask: a question (and optional images) as a multipart form; the answer with its sources."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import StreamingResponse

from server.api_models import AskForm, AskResponse
from server.auth import ChatAuth
from server.deps import CallerDep, ChatServiceDep, MetricsDep, SettingsDep, use_kb
from server.knowledge_bases.access import choose_kb
from server.limits import check_upload_count
from server.routes.streaming import sse_response

router = APIRouter(tags=["chat"], dependencies=[ChatAuth])


@router.post("/v1/ask", response_model=AskResponse)
async def ask(
    service: ChatServiceDep, metrics: MetricsDep, settings: SettingsDep, caller: CallerDep, http: Request,
    form: Annotated[AskForm, Form()],
    image: Annotated[list[UploadFile] | None, File(description="Optional image file(s).")] = None,
) -> AskResponse | StreamingResponse:
    """Retrieve, select and answer; ``stream=true`` gives the same SSE chunks as chat completions."""
    files = image or []
    check_upload_count(settings, len(files), param="image")
    uploads = [(await f.read(), f.filename) for f in files]
    prepared = await service.prepare_ask(form.question, uploads, form.retrieval_options(),
                                         max_tokens=form.max_tokens, temperature=form.temperature,
                                         kb_name=use_kb(http, choose_kb(caller, form.kb)), caller=caller)
    if form.stream:
        return sse_response(await service.open_stream(prepared), metrics)
    result = await service.complete(prepared)
    choice = result.choices[0]
    return AskResponse(
        answer=choice.message.content or "", model=result.model, id=result.id, sources=result.sources,
        timings=result.timings, usage=result.usage.model_dump() if result.usage else None, degraded=result.degraded,
        finish_reason=choice.finish_reason, verification=result.verification,
    )
