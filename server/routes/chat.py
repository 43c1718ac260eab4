"""POST /v1/chat/completions (OpenAI-compatible, with the ``retrieval``/``sources`` extensions)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from server.auth import ChatAuth
from server.deps import ChatServiceDep, MetricsDep
from server.protocol import ChatCompletionRequest, ChatCompletionResponse
from server.routes.streaming import sse_response

router = APIRouter(tags=["chat"], dependencies=[ChatAuth])


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(
    request: ChatCompletionRequest, service: ChatServiceDep, metrics: MetricsDep,
) -> ChatCompletionResponse | StreamingResponse:
    """Answer the conversation from the knowledge base; ``stream: true`` gives SSE chunks."""
    prepared = await service.prepare_chat(request)
    if request.stream:
        return sse_response(await service.open_stream(prepared), metrics)
    return await service.complete(prepared)
