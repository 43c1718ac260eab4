"""Retry policy, replica spreading and stream handling of server/vllm_client.py (MockTransport)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from retriever.errors import InvalidInput, ModelUnavailable, UpstreamError
from server.vllm_client import VLLMClient
from tests.support.media import sse_body

COMPLETION = {
    "id": "x", "object": "chat.completion", "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}


def chunk(text: str | None = None, role: str | None = None) -> dict:
    delta = {k: v for k, v in (("role", role), ("content", text)) if v is not None}
    return {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}


class Recorder:
    """A MockTransport handler that answers from a script and records what it saw."""

    def __init__(self, *script: Callable[[httpx.Request], httpx.Response] | httpx.Response | Exception):
        self.script = list(script)
        self.requests: list[httpx.Request] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        step = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(step, Exception):
            raise step
        if callable(step) and not isinstance(step, httpx.Response):
            result = step(request)
            return await result if asyncio.iscoroutine(result) else result
        return step

    @property
    def hosts(self) -> list[str]:
        return [r.url.host for r in self.requests]


def make_client(handler, urls=("http://a:8000",), **kw) -> VLLMClient:
    opts: dict = {"retry_attempts": 3, "backoff_base_s": 0.001, "backoff_max_s": 0.01, "deadline_s": 5.0}
    opts.update(kw)
    return VLLMClient(list(urls), "m", transport=httpx.MockTransport(handler), **opts)


async def test_complete_sends_model_and_returns_json() -> None:
    rec = Recorder(httpx.Response(200, json=COMPLETION))
    client = make_client(rec, api_key="secret")
    out = await client.complete({"messages": [{"role": "user", "content": "q"}]})
    assert out["choices"][0]["message"]["content"] == "hi"
    sent = json.loads(rec.requests[0].content)
    assert sent["model"] == "m" and sent["stream"] is False
    assert rec.requests[0].url.path == "/v1/chat/completions"
    assert rec.requests[0].headers["authorization"] == "Bearer secret"


@pytest.mark.parametrize("failure", [
    httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), httpx.Response(503, json={"message": "busy"}),
    httpx.Response(502, text="bad gateway"), httpx.Response(429, json={"error": {"message": "slow down"}}),
])
async def test_transient_failures_are_retried(failure) -> None:
    rec = Recorder(failure, httpx.Response(200, json=COMPLETION))
    client = make_client(rec)
    out = await client.complete({"messages": []})
    assert out["usage"]["total_tokens"] == 4
    assert len(rec.requests) == 2


async def test_out_of_retries_is_model_unavailable_with_retry_after() -> None:
    rec = Recorder(httpx.ConnectError("refused"))
    client = make_client(rec, retry_attempts=3, unhealthy_for_s=7)
    with pytest.raises(ModelUnavailable) as info:
        await client.complete({"messages": []})
    assert len(rec.requests) == 3
    assert info.value.retry_after == 7
    assert "3 attempt" in info.value.message


@pytest.mark.parametrize("status,error", [(400, InvalidInput), (404, UpstreamError), (401, UpstreamError)])
async def test_caller_and_config_errors_are_not_retried(status, error) -> None:
    rec = Recorder(httpx.Response(status, json={"message": "prompt too long"}))
    client = make_client(rec)
    with pytest.raises(error) as info:
        await client.complete({"messages": []})
    assert len(rec.requests) == 1
    assert "prompt too long" in info.value.message


@pytest.mark.parametrize("garbage", [b"<html>oops</html>", b"[1, 2]", b'{"no": "choices"}'])
async def test_garbage_is_upstream_error(garbage: bytes) -> None:
    rec = Recorder(httpx.Response(200, content=garbage))
    with pytest.raises(UpstreamError):
        await make_client(rec).complete({"messages": []})
    assert len(rec.requests) == 1


async def test_total_deadline_bounds_retries_and_hangs() -> None:
    async def hang(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(30)
        raise AssertionError("not reached")

    client = make_client(Recorder(hang), deadline_s=0.3, retry_attempts=10)
    start = time.monotonic()
    with pytest.raises(ModelUnavailable, match="within"):
        await client.complete({"messages": []})
    assert time.monotonic() - start < 1.5


async def test_deadline_stops_retrying_before_a_long_backoff() -> None:
    rec = Recorder(httpx.Response(503, headers={"retry-after": "1"}))
    client = make_client(rec, deadline_s=0.2, retry_attempts=10, backoff_max_s=1.0)
    start = time.monotonic()
    with pytest.raises(ModelUnavailable):
        await client.complete({"messages": []})
    assert time.monotonic() - start < 0.6
    assert len(rec.requests) == 1  # the 1 s Retry-After wait would cross the deadline


async def test_failing_replica_is_skipped_for_a_while() -> None:
    now = [1000.0]

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "bad":
            raise httpx.ConnectError("refused")
        return httpx.Response(200, json=COMPLETION)

    rec = Recorder(handler)
    client = make_client(rec, urls=("http://bad:1", "http://good:1"), unhealthy_for_s=10,
                         clock=lambda: now[0])
    for _ in range(4):
        await client.complete({"messages": []})
    # at most one attempt went to the bad replica; after that it sat out
    assert rec.hosts.count("bad") <= 1
    assert rec.hosts.count("good") == 4
    bad_before = rec.hosts.count("bad")
    now[0] += 11  # sit-out over: it gets tried again
    for _ in range(2):
        await client.complete({"messages": []})
    assert rec.hosts.count("bad") == bad_before + 1


async def test_requests_spread_by_least_in_flight() -> None:
    release = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        await release.wait()
        return httpx.Response(200, json=COMPLETION)

    rec = Recorder(handler)
    client = make_client(rec, urls=("http://a:1", "http://b:1", "http://c:1"))
    tasks = [asyncio.create_task(client.complete({"messages": []})) for _ in range(6)]
    await asyncio.sleep(0.05)
    assert sorted(r.in_flight for r in client.pool.replicas) == [2, 2, 2]
    release.set()
    await asyncio.gather(*tasks)
    assert all(r.in_flight == 0 for r in client.pool.replicas)
    assert sorted(rec.hosts) == ["a", "a", "b", "b", "c", "c"]


async def test_stream_retries_before_first_token_then_relays() -> None:
    body = sse_body([chunk(role="assistant", text=""), chunk("Hel"), chunk("lo")])
    rec = Recorder(httpx.Response(503), httpx.ConnectError("x"), httpx.Response(200, content=body))
    client = make_client(rec, retry_attempts=3)
    stream = await client.open_stream({"messages": [], "stream_options": {"include_usage": True}})
    texts = [c["choices"][0]["delta"].get("content") async for c in stream]
    assert texts == ["", "Hel", "lo"]
    assert len(rec.requests) == 3
    sent = json.loads(rec.requests[-1].content)
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert client.pool.replicas[0].in_flight == 0


async def test_stream_is_never_retried_after_tokens_flowed() -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield f"data: {json.dumps(chunk('tok'))}\n\n".encode()
        raise httpx.ReadError("connection reset")

    rec = Recorder(lambda r: httpx.Response(200, content=broken()))
    client = make_client(rec, retry_attempts=5)
    stream = await client.open_stream({"messages": []})
    got = []
    with pytest.raises(ModelUnavailable, match="stream broke"):
        async for c in stream:
            got.append(c["choices"][0]["delta"]["content"])
    assert got == ["tok"]
    assert len(rec.requests) == 1
    assert client.pool.replicas[0].in_flight == 0


async def test_stream_error_event_and_garbage_mid_stream() -> None:
    body = f"data: {json.dumps(chunk('a'))}\n\ndata: {{\"error\": {{\"message\": \"oom\"}}}}\n\n".encode()
    client = make_client(Recorder(httpx.Response(200, content=body)))
    stream = await client.open_stream({"messages": []})
    with pytest.raises(UpstreamError, match="oom"):
        async for _ in stream:
            pass
    client = make_client(Recorder(httpx.Response(200, content=b"data: not-json\n\n")))
    with pytest.raises(UpstreamError, match="malformed"):
        await client.open_stream({"messages": []})


async def test_stream_dropped_before_first_event_is_retried() -> None:
    async def dies() -> AsyncIterator[bytes]:
        raise httpx.RemoteProtocolError("peer closed")
        yield b""  # pragma: no cover

    rec = Recorder(lambda r: httpx.Response(200, content=dies()), httpx.Response(200, content=sse_body([chunk("ok")])))
    stream = await make_client(rec).open_stream({"messages": []})
    assert [c["choices"][0]["delta"]["content"] async for c in stream] == ["ok"]
    assert len(rec.requests) == 2


async def test_tokenize_uses_root_path_even_with_v1_base() -> None:
    rec = Recorder(httpx.Response(200, json={"tokens": [5, 6], "count": 2}))
    client = make_client(rec, urls=("http://a:8000/v1/",))
    assert await client.tokenize("Yes") == [5, 6]
    assert rec.requests[0].url.path == "/tokenize"
    assert json.loads(rec.requests[0].content)["prompt"] == "Yes"


async def test_probe_reports_each_replica_and_clears_sit_out() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "down":
            raise httpx.ConnectError("refused")
        return httpx.Response(200, json={"data": [{"id": "m"}]})

    client = make_client(Recorder(handler), urls=("http://up:1", "http://down:1"))
    client.pool.mark_failed(client.pool.replicas[0])
    result = await client.probe()
    assert result == {"http://up:1": "ok", "http://down:1": "ConnectError"}
    assert client.pool.replicas[0].unhealthy_until == 0.0
