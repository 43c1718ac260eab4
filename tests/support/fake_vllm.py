"""A scripted stand-in for vLLM's HTTP API, plugged in as the httpx transport of the vLLM clients.

Only for API tests that need control the real tiny vLLM cannot give (failures on demand, exact
answers); the e2e tier uses the real server. It answers ``/v1/models``, ``/tokenize`` and
``/v1/chat/completions`` (plain, streamed, and re-rank requests with ``logprobs``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx


def _image_count(messages: list[dict[str, Any]]) -> int:
    return sum(1 for m in messages if isinstance(m.get("content"), list)
               for p in m["content"] if p.get("type") == "image_url")


def _text_len(messages: list[dict[str, Any]]) -> int:
    total = 0
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(p.get("text", "")) for p in content if p.get("type") == "text")
    return total


def _is_rewrite(body: dict[str, Any]) -> bool:
    content = body["messages"][-1].get("content")
    return isinstance(content, str) and "<conversation>" in content


class FakeVLLM:
    """Records every chat body; ``failures`` scripts the next answers (status codes or exceptions)."""

    def __init__(self, model: str = "tiny-vlm", answer: str = "The manual says so [1].") -> None:
        self.model = model
        self.answer = answer
        self.chat_bodies: list[dict[str, Any]] = []
        self.failures: list[int | Exception] = []
        self.rerank_failures: list[int | Exception] = []
        self.break_stream_after: int | None = None  # tokens sent before the stream dies
        self.yes_logprob = -0.1  # rerank: log P("Yes"); "No" gets log(1 - P(yes))
        self.rerank_delay_s = 0.0  # each logprobs (re-rank, answer check) request waits this long first
        self.down = False
        self.garbage: bytes | None = None  # answer chat requests with these bytes (status 200)
        # Replayed for requests with `tools`: {"non_stream": response, "stream_named": [events]} as captured
        # from the real vLLM (tests/data/vllm_samples/tool_calls.json).
        self.tool_sample: dict[str, Any] | None = None
        self.rewrite_answer: str | None = None  # the answer to a query-rewrite request (prompts/rewrite.jinja)

    @property
    def answer_bodies(self) -> list[dict[str, Any]]:
        return [b for b in self.chat_bodies if not b.get("logprobs")]

    def usage(self, body: dict[str, Any], completion: int) -> dict[str, int]:
        # deterministic "tokens": 1 per 4 chars of text, 4 per image
        prompt = _text_len(body["messages"]) // 4 + 4 * _image_count(body["messages"])
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused")
        path = request.url.path
        if path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": self.model, "object": "model"}]})
        if path == "/tokenize":
            prompt = json.loads(request.content)["prompt"]
            return httpx.Response(200, json={"tokens": [1000 + len(prompt)], "count": 1})
        if path != "/v1/chat/completions":
            return httpx.Response(404, json={"message": "not found"})
        body = json.loads(request.content)
        self.chat_bodies.append(body)
        rerank = bool(body.get("logprobs")) and not body.get("stream")  # a streamed one is a chat
        script = self.rerank_failures if rerank else self.failures
        if script:
            failure = script.pop(0)
            if isinstance(failure, Exception):
                raise failure
            return httpx.Response(failure, json={"message": f"scripted {failure}"})
        if rerank:
            if self.rerank_delay_s:
                await asyncio.sleep(self.rerank_delay_s)
            return httpx.Response(200, json=self._rerank_answer(body))
        if self.garbage is not None:
            return httpx.Response(200, content=self.garbage)
        if self.tool_sample is not None and body.get("tools"):
            return self._replay_tools(body)
        if self.rewrite_answer is not None and _is_rewrite(body):
            return httpx.Response(200, json={
                "id": "cmpl-rw", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": self.rewrite_answer},
                             "finish_reason": "stop"}],
                "usage": self.usage(body, 4),
            })
        tokens = self.answer.split(" ")
        if not body.get("stream"):
            return httpx.Response(200, json={
                "id": "cmpl-fake", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": self.answer},
                             "finish_reason": "stop"}],
                "usage": self.usage(body, len(tokens)),
            })
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              content=self._stream(body, tokens))

    def _replay_tools(self, body: dict[str, Any]) -> httpx.Response:
        assert self.tool_sample is not None
        if not body.get("stream"):
            return httpx.Response(200, json=self.tool_sample["non_stream"])

        async def events() -> AsyncIterator[bytes]:
            for event in self.tool_sample["stream_named"]:  # type: ignore[index]
                yield f"data: {json.dumps(event)}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=events())

    def _rerank_answer(self, body: dict[str, Any]) -> dict[str, Any]:
        import math

        p_yes = math.exp(self.yes_logprob)
        top = [{"token": "Yes", "logprob": self.yes_logprob},
               {"token": "No", "logprob": math.log(max(1e-9, 1 - p_yes))}]
        return {
            "id": "cmpl-rr", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Yes"}, "finish_reason": "length",
                         "logprobs": {"content": [{"token": "Yes", "logprob": self.yes_logprob,
                                                   "top_logprobs": top}]}}],
            "usage": self.usage(body, 1),
        }

    async def _stream(self, body: dict[str, Any], tokens: list[str]) -> AsyncIterator[bytes]:
        def event(data: dict[str, Any]) -> bytes:
            return f"data: {json.dumps(data)}\n\n".encode()

        base = {"id": "cmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": body["model"]}
        yield event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        for i, tok in enumerate(tokens):
            if self.break_stream_after is not None and i >= self.break_stream_after:
                raise httpx.ReadError("connection reset by peer")
            text = tok if i == 0 else " " + tok
            choice: dict[str, Any] = {"index": 0, "delta": {"content": text}, "finish_reason": None}
            if body.get("logprobs"):
                choice["logprobs"] = {"content": [{"token": text, "logprob": -0.5, "top_logprobs": []}]}
            yield event({**base, "choices": [choice]})
        yield event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            yield event({**base, "choices": [], "usage": self.usage(body, len(tokens))})
        yield b"data: [DONE]\n\n"
