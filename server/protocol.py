"""OpenAI-compatible wire models for /v1/chat/completions and /v1/models (no logic here).

Only what vlmrag accepts and returns; unknown request fields are ignored (SDKs add new ones over
time), so a newer client keeps working. vlmrag's extensions (``retrieval`` in the request,
``sources``/``degraded``/``timings`` in the response) are typed in ``server/api_models.py``.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.api_models import RetrievalOptions, SourceItem


class _Wire(BaseModel):
    """Base of request models: tolerate fields we do not know."""

    model_config = ConfigDict(extra="ignore")


class ImageURL(_Wire):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Wire):
    type: Literal["text"] = "text"
    text: str


class ImagePart(_Wire):
    type: Literal["image_url"] = "image_url"
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Wire):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Wire):
    include_usage: bool = False


class ChatCompletionRequest(_Wire):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = Field(None, max_length=256)
    n: int = Field(1, ge=1, le=1, description="Only one choice is supported.")
    # vlmrag extension: how the knowledge base is searched for this request.
    retrieval: RetrievalOptions | None = None


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None = None


def new_completion_id() -> str:
    """An id in OpenAI's style (``chatcmpl-…``)."""
    return f"chatcmpl-{uuid.uuid4().hex}"


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=new_completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: UsageInfo | None = None
    # vlmrag extensions
    sources: list[SourceItem] = Field(default_factory=list)
    degraded: list[str] = Field(default_factory=list)
    timings: dict[str, float] = Field(default_factory=dict)


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice] = Field(default_factory=list)
    usage: UsageInfo | None = None
    # vlmrag extensions: only on the final chunk (before ``data: [DONE]``)
    sources: list[SourceItem] | None = None
    degraded: list[str] | None = None
    timings: dict[str, float] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "vlmrag"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
