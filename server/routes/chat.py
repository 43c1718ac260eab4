"""POST /v1/chat/completions (OpenAI-compatible, with the ``retrieval``/``sources`` extensions)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from server.auth import ChatAuth
from server.deps import CallerDep, ChatServiceDep, MetricsDep, SettingsDep, use_kb
from server.knowledge_bases.access import choose_kb
from server.protocol import ChatCompletionRequest, ChatCompletionResponse
from server.routes.streaming import sse_response

router = APIRouter(tags=["chat"], dependencies=[ChatAuth])


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(
    request: ChatCompletionRequest, service: ChatServiceDep, metrics: MetricsDep, settings: SettingsDep,
    caller: CallerDep, http: Request,
) -> ChatCompletionResponse | StreamingResponse:
    """Answer the conversation from the knowledge base; ``stream: true`` gives SSE chunks."""
    kb = use_kb(http, choose_kb(caller, request.retrieval.kb if request.retrieval else None, model=request.model,
                                alias=settings.model_alias))
    prepared = await service.prepare_chat(request, kb, caller=caller)
    if request.stream:
        return sse_response(await service.open_stream(prepared), metrics)
    return await service.complete(prepared)
