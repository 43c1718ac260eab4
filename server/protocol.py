"""OpenAI-compatible wire models for /v1/chat/completions and /v1/models (no logic here).

Only what vlmrag accepts and returns; unknown request fields are ignored (SDKs add new ones over
time), so a newer client keeps working. vlmrag's extensions (``retrieval`` in the request,
``sources``/``degraded``/``timings`` in the response) are typed in ``server/api_models.py``.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from server.api_models import RetrievalOptions, SourceItem, Verification


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
CONTENT_PART_TYPES = ("text", "image_url")


class FunctionCall(_Wire):
    name: str
    arguments: str = ""


class ToolCall(_Wire):
    """A call the assistant made, as the caller sends it back in the conversation."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Wire):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="Assistant messages: the calls it made.")
    tool_call_id: str | None = Field(None, description="Tool messages: the call this is the result of.")

    @field_validator("content", mode="before")
    @classmethod
    def _supported_parts(cls, value: Any) -> Any:
        if isinstance(value, list):
            for part in value:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in CONTENT_PART_TYPES:
                    raise ValueError(f"content part type {kind!r} is not supported; vlmrag accepts "
                                     f"{' and '.join(CONTENT_PART_TYPES)} parts")
        return value

    @model_validator(mode="after")
    def _role_fields(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id (the id of the call it answers)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self


class StreamOptions(_Wire):
    include_usage: bool = False


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")  # forwarded as sent: vLLM and the model decide

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Wire):
    name: str


class NamedToolChoice(_Wire):
    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Wire):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a json_schema object")
        return self


# Request fields that would change the output but that vlmrag does not forward: refused (400 naming
# the field) rather than dropped silently. Everything else unknown is ignored.
REFUSED_FIELDS: dict[str, str] = {
    "functions": "use `tools` (the deprecated `functions` is not supported)",
    "function_call": "use `tool_choice` (the deprecated `function_call` is not supported)",
    "audio": "audio output is not supported", "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported", "web_search_options": "web search is not supported",
    "echo": "not supported through vlmrag (the prompt carries retrieved context)",
    "add_generation_prompt": "vlmrag builds the prompt", "continue_final_message": "vlmrag builds the prompt",
    "chat_template": "vlmrag builds the prompt", "chat_template_kwargs": "vlmrag builds the prompt",
    "documents": "vlmrag supplies the documents: use `retrieval`", "prompt_logprobs": "not supported through vlmrag",
    "use_beam_search": "beam search is not supported", "best_of": "not supported",
    "mm_processor_kwargs": "not supported", "logits_processors": "not supported", "vllm_xargs": "not supported",
    "return_tokens_as_token_ids": "not supported", "allowed_token_ids": "not supported",
}

# Fields forwarded to vLLM as given (the OpenAI ones and vLLM's sampling extensions that SDKs send
# through ``extra_body``); ``stream``, ``stream_options`` and ``max_tokens`` are handled by the service.
FORWARDED_FIELDS = (
    "temperature", "top_p", "stop", "seed", "n", "frequency_penalty", "presence_penalty", "logit_bias",
    "logprobs", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls", "response_format",
    "top_k", "min_p", "repetition_penalty", "length_penalty", "min_tokens", "stop_token_ids",
    "include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens", "bad_words",
    "ignore_eos", "structured_outputs",
)
# vLLM's older guided-decoding fields, translated into ``structured_outputs`` (vLLM >= 0.11 ignores them).
GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}


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
    n: int = Field(1, ge=1, le=8, description="Choices to generate (each answers from the same sources).")
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, max_length=300)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ToolDefinition] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    # vLLM sampling extensions (OpenAI SDK: extra_body={...})
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    length_penalty: float | None = None
    min_tokens: int | None = Field(None, ge=0)
    stop_token_ids: list[int] | None = Field(None, max_length=64)
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    bad_words: list[str] | None = Field(None, max_length=64)
    ignore_eos: bool | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # vlmrag extension: how the knowledge base is searched for this request.
    retrieval: RetrievalOptions | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_unforwarded(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, why in REFUSED_FIELDS.items():
                if data.get(name) not in (None, False):
                    raise PydanticCustomError("unsupported_field", "{name}: {why}", {"name": name, "why": why})
        return data

    @model_validator(mode="after")
    def _tool_choice_needs_tools(self) -> ChatCompletionRequest:
        if isinstance(self.tool_choice, NamedToolChoice):
            names = {t.function.name for t in self.tools or []}
            if self.tool_choice.function.name not in names:
                raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which is not in tools")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def sampling_fields(self) -> dict[str, Any]:
        """What goes to vLLM besides the messages, as the caller gave it (unset fields left out)."""
        body = self.model_dump(include=set(FORWARDED_FIELDS), exclude_none=True, by_alias=True)
        if body.get("n") == 1:
            del body["n"]  # the default: keep the upstream body as before
        guided = {GUIDED_FIELDS[name]: getattr(self, name) for name in GUIDED_FIELDS if getattr(self, name) is not None}
        if guided:
            body["structured_outputs"] = {**guided, **body.get("structured_outputs", {})}
        return body


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # relayed as the model server sent them
    reasoning: str | None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: dict[str, Any] | None = None
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
    search_query: str | None = Field(None, description="What the knowledge base was searched with.")
    verification: Verification | None = Field(None, description="The first choice checked against its sources.")


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # index, id, name, argument fragments: as vLLM sent them
    reasoning: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: dict[str, Any] | None = None
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
    search_query: str | None = None
    verification: Verification | None = None


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
