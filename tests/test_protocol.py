"""Wire models (what OpenAI clients send and get) and the error mapping of server/errors.py."""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel, ValidationError

from retriever import errors as E
from server.errors import as_vlmrag_error, body_for, headers_for, install_error_handlers, sse_error_event
from server.protocol import (
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
)


def test_request_accepts_what_openai_sdks_send() -> None:
    req = ChatCompletionRequest.model_validate({
        "model": "vlmrag", "stream": True, "stream_options": {"include_usage": True}, "temperature": 0,
        "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "q"},
                                         {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA",
                                                                             "detail": "low"}}]},
            {"role": "assistant", "content": None},
        ],
        "parallel_tool_calls": False, "logit_bias": {}, "store": False,  # newer SDK fields: ignored
        "retrieval": {"k": 2, "threshold": 0.4, "filters": {"tags": ["a"], "kind": ["text"]}, "scorer": "clip"},
    })
    parts = req.messages[1].content
    assert isinstance(parts, list) and parts[1].type == "image_url" and parts[1].image_url.detail == "low"
    assert req.retrieval is not None and req.retrieval.filters is not None and req.retrieval.filters.tags == ["a"]


@pytest.mark.parametrize("bad", [
    {"messages": [{"role": "tool", "content": "x"}]},  # a tool result names the call it answers
    {"messages": [{"role": "user", "content": "x", "tool_calls": [{"id": "c", "function": {"name": "f"}}]}]},
    {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]},
    {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "x"}}]}]},
    {"messages": [{"role": "user", "content": "x"}], "n": 9},
    {"messages": [{"role": "user", "content": "x"}], "functions": [{"name": "f"}]},
    {"messages": [{"role": "user", "content": "x"}], "echo": True},
    {"messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "function", "function": {"name": "f"}}},
    {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}},
    {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3},
    {"messages": [{"role": "user", "content": "x"}], "temperature": 3},
    {"messages": [{"role": "user", "content": "x"}], "retrieval": {"threshold": 2}},
    {"messages": [{"role": "user", "content": "x"}], "retrieval": {"scorer": "magic"}},
])
def test_request_refuses_what_we_cannot_honour(bad: dict) -> None:
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(bad)


def test_response_and_chunk_shapes() -> None:
    resp = ChatCompletionResponse(model="vlmrag", choices=[Choice(message=AssistantMessage(content="hi"))])
    data = resp.model_dump()
    assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-")
    assert data["sources"] == [] and data["degraded"] == []
    chunk = ChatCompletionChunk(id="c", created=1, model="m").model_dump(exclude_none=True)
    assert chunk == {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": []}


@pytest.mark.parametrize("exc,status,type_,code", [
    (E.InvalidInput("x", param="p"), 400, "invalid_request_error", None),
    (E.PayloadTooLarge("x"), 413, "invalid_request_error", "payload_too_large"),
    (E.UnsupportedMediaType("x"), 415, "invalid_request_error", "unsupported_media_type"),
    (E.UnprocessableInput("x"), 422, "invalid_request_error", "unprocessable"),
    (E.Unauthorized("x"), 401, "authentication_error", "invalid_api_key"),
    (E.Forbidden("x"), 403, "permission_error", "insufficient_scope"),
    (E.NotFound("x"), 404, "not_found_error", "not_found"),
    (E.Conflict("x"), 409, "conflict_error", "conflict"),
    (E.RateLimited("x", retry_after=2.2), 429, "rate_limit_error", "rate_limited"),
    (E.StoreUnavailable("x"), 503, "service_unavailable", "store_unavailable"),
    (E.ModelUnavailable("x"), 503, "service_unavailable", "model_unavailable"),
    (E.Overloaded("x"), 503, "service_unavailable", "overloaded"),
    (E.UpstreamError("x"), 502, "upstream_error", "bad_upstream_response"),
    (RuntimeError("secret"), 500, "server_error", "internal_error"),
])
def test_error_tree_maps_to_openai_bodies(exc: Exception, status: int, type_: str, code: str | None) -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    async def boom() -> None:
        raise exc

    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/boom")
    assert r.status_code == status
    assert r.json() == {"error": {"message": "internal error; see the server log" if status == 500 else "x",
                                  "type": type_, "param": getattr(exc, "param", None), "code": code}}
    if status in (429, 503):
        assert int(r.headers["retry-after"]) == (3 if status == 429 else 5)
    else:
        assert "retry-after" not in r.headers


class Body(BaseModel):
    k: int


def test_validation_errors_are_400_naming_the_param() -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/x")
    async def x(body: Body) -> dict:
        return {}

    with TestClient(app) as client:
        r = client.post("/x", json={"k": "many"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "k"
        assert r.json()["error"]["type"] == "invalid_request_error"
        r = client.post("/x", content=b"{", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_sse_error_event_and_helpers() -> None:
    event = sse_error_event(E.ModelUnavailable("gone"))
    assert event.startswith("data: ") and event.endswith("\n\n")
    assert json.loads(event[6:])["error"]["code"] == "model_unavailable"
    hidden = json.loads(sse_error_event(ValueError("password=hunter2"))[6:])
    assert "hunter2" not in json.dumps(hidden) and hidden["error"]["type"] == "server_error"
    assert headers_for(E.Overloaded("x", retry_after=0.2)) == {"Retry-After": "1"}
    assert body_for(as_vlmrag_error(E.NotFound("n")))["error"]["type"] == "not_found_error"
