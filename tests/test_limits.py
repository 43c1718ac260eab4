"""Input limits: 413 bodies (declared and streamed, via ASGI and a real uvicorn), CORS, and the caps."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from functools import partial
from types import SimpleNamespace

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request

from retriever.errors import InvalidInput
from server.errors import install_error_handlers
from server.limits import check_chat_request, check_retrieval_caps, check_upload_count
from server.middleware import install_middleware
from server.protocol import ChatCompletionRequest
from server.settings import Settings
from tests.support.media import data_url, noise_png
from tests.support.settings import bare_settings

LIMIT = 4096


_settings = partial(bare_settings, limit_body_bytes=LIMIT, auth_disabled=True)


def _app(settings: Settings) -> tuple[FastAPI, SimpleNamespace]:
    """The real middleware and error handlers around routes that read JSON, raw and form bodies."""
    app = FastAPI()
    install_error_handlers(app)
    install_middleware(app, settings)
    seen = SimpleNamespace(calls=0, completed=0)

    @app.post("/json")
    async def json_route(body: dict[str, object]) -> dict[str, int]:
        seen.completed += 1
        return {"keys": len(body)}

    @app.post("/raw")
    async def raw_route(request: Request) -> dict[str, int]:
        seen.calls += 1
        data = await request.body()
        seen.completed += 1
        return {"bytes": len(data)}

    @app.post("/form")
    async def form_route(request: Request) -> dict[str, int]:
        seen.calls += 1
        form = await request.form()
        seen.completed += 1
        return {"fields": len(form)}

    return app, seen


def _client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


async def _chunks(total: int, size: int = 1000, head: bytes = b"") -> AsyncIterator[bytes]:
    yield head
    for start in range(0, total, size):
        yield b"x" * min(size, total - start)


MULTIPART_HEAD = b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'


def _assert_413(response: httpx.Response) -> None:
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "body_too_large"
    assert str(LIMIT) in error["message"]


async def test_declared_oversize_is_refused_before_the_app_runs() -> None:
    app, seen = _app(_settings())
    async with _client(app) as client:
        _assert_413(await client.post("/raw", content=b"x" * (LIMIT + 1)))
        _assert_413(await client.post("/json", content=b'{"a": "' + b"x" * LIMIT + b'"}',
                                      headers={"content-type": "application/json"}))
        assert (await client.post("/raw", content=b"x" * LIMIT)).json() == {"bytes": LIMIT}
    assert seen.calls == 1


@pytest.mark.parametrize("path", ["/raw", "/json", "/form"])
async def test_chunked_oversize_is_counted_and_cut_off(path: str) -> None:
    app, seen = _app(_settings())
    headers = {"content-type": "application/json" if path == "/json" else "multipart/form-data; boundary=b"}
    async with _client(app) as client:
        body = _chunks(LIMIT * 3, head=MULTIPART_HEAD if path == "/form" else b"")
        response = await client.post(path, content=body, headers=headers)
    _assert_413(response)
    assert seen.completed == 0


async def test_chunked_under_the_limit_passes() -> None:
    app, _ = _app(_settings())
    async with _client(app) as client:
        response = await client.post("/raw", content=_chunks(LIMIT - 10))
    assert response.json() == {"bytes": LIMIT - 10}


@pytest.mark.subprocess
async def test_real_uvicorn_answers_413_to_a_large_upload() -> None:
    """Over a socket: the client gets the 413 (not a reset or a hang) for declared and chunked bodies."""
    app, seen = _app(_settings())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            _assert_413(await client.post("/raw", content=b"x" * (LIMIT * 50)))
            _assert_413(await client.post("/raw", content=_chunks(LIMIT * 50, size=8192)))
            assert (await client.post("/raw", content=b"ok")).json() == {"bytes": 2}
    finally:
        server.should_exit = True
        await task
    assert seen.completed == 1


async def test_cors_off_by_default_and_configurable() -> None:
    app, _ = _app(_settings())
    async with _client(app) as client:
        response = await client.options("/raw", headers={"Origin": "https://support.example",
                                                          "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in response.headers

    app, _ = _app(_settings(cors_origins="https://support.example"))
    async with _client(app) as client:
        preflight = await client.options("/raw", headers={
            "Origin": "https://support.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        refused = await client.post("/raw", content=b"x" * (LIMIT + 1), headers={"Origin": "https://support.example"})
        other = await client.options("/raw", headers={"Origin": "https://evil.example",
                                                       "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://support.example"
    # Even an error carries CORS headers, so the browser lets the page read the 413 body.
    assert refused.status_code == 413 and refused.headers["access-control-allow-origin"] == "https://support.example"
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers


# --- request-shape caps ------------------------------------------------------------------------

def _chat(messages: list[dict[str, object]], **kw: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": messages, **kw})


def _dumped(request: ChatCompletionRequest) -> list[dict[str, object]]:
    """The messages as the chat service checks them: OpenAI dicts."""
    return [m.model_dump(exclude_none=True) for m in request.messages]


IMG = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}


@pytest.mark.parametrize("request_kw, param, code", [
    ({"messages": [{"role": "user", "content": "hi"}] * 4}, "messages", "too_many_messages"),
    ({"messages": [{"role": "user", "content": "x" * 101}]}, "messages[0].content", "message_too_long"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x" * 60}] * 2}]},
     "messages[0].content", "message_too_long"),
    ({"messages": [{"role": "user", "content": [IMG] * 3}]}, "messages[0].content", "too_many_images"),
    ({"messages": [{"role": "user", "content": [IMG] * 2}, {"role": "user", "content": [IMG] * 2}]},
     "messages", "too_many_images"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 65}, "max_tokens", "limit_exceeded"),
])
def test_chat_caps(request_kw: dict[str, object], param: str, code: str) -> None:
    settings = _settings(limit_messages=3, limit_message_chars=100, limit_images_per_message=2,
                         limit_images_per_request=3, limit_max_tokens=64)
    request = _chat(**request_kw)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput) as info:
        check_chat_request(settings, _dumped(request), max_tokens=request.max_tokens)
    assert (info.value.param, info.value.code, info.value.status_code) == (param, code, 400)


def test_caps_at_the_limit_pass() -> None:
    settings = _settings(limit_messages=3, limit_message_chars=100, limit_images_per_message=2,
                         limit_images_per_request=4, limit_max_tokens=64, limit_k=5, limit_pool=50,
                         limit_upload_files=2)
    request = _chat([{"role": "user", "content": [IMG, IMG, {"type": "text", "text": "x" * 100}]},
                     {"role": "assistant", "content": "x" * 100}, {"role": "user", "content": [IMG, IMG]}],
                    max_tokens=64)
    check_chat_request(settings, _dumped(request), max_tokens=64, k=5, pool=50)
    check_upload_count(settings, 2)
    with pytest.raises(InvalidInput) as info:
        check_retrieval_caps(settings, k=6, param_prefix="retrieval.")
    assert info.value.param == "retrieval.k" and "VLMRAG_LIMIT_K" in info.value.message
    with pytest.raises(InvalidInput) as info:
        check_retrieval_caps(settings, pool=51)
    assert info.value.param == "pool"
    with pytest.raises(InvalidInput):
        check_upload_count(settings, 3)


# --- the real app ---------------------------------------------------------------------------------

def _image_part(data: bytes) -> dict[str, object]:
    return {"type": "image_url", "image_url": {"url": data_url(data)}}


def _user(*parts: dict[str, object]) -> dict[str, object]:
    return {"role": "user", "content": [{"type": "text", "text": "what is this?"}, *parts]}


REAL_LIMITS: dict[str, int] = {
    "limit_body_bytes": 200_000, "limit_image_bytes": 20_000, "limit_images_per_message": 2,
    "limit_images_per_request": 3, "limit_messages": 4, "limit_message_chars": 500, "limit_max_tokens": 64,
    "limit_k": 5, "limit_pool": 10, "limit_upload_files": 2,
}


async def test_real_app_limits_give_clear_4xx(make_client) -> None:
    small, big = noise_png(16, seed=0), noise_png(120, seed=0)  # ~1 KB and ~43 KB of incompressible noise
    assert len(big) > REAL_LIMITS["limit_image_bytes"]
    chat = "/v1/chat/completions"
    cases: list[tuple[str, dict[str, object], int, str | None]] = [
        (chat, {"json": {"messages": [_user(_image_part(noise_png(300, seed=0)))]}}, 413, None),  # body > 200 KB
        (chat, {"json": {"messages": [_user(_image_part(big))]}}, 413, "messages[0].content[1].image_url"),
        (chat, {"json": {"messages": [_user(*[_image_part(small)] * 3)]}}, 400, "messages[0].content"),
        (chat, {"json": {"messages": [_user(*[_image_part(small)] * 2), {"role": "assistant", "content": "ok"},
                                      _user(*[_image_part(small)] * 2)]}}, 400, "messages"),
        (chat, {"json": {"messages": [{"role": "user", "content": "hi"}] * 5}}, 400, "messages"),
        (chat, {"json": {"messages": [{"role": "user", "content": "x" * 501}]}}, 400, "messages[0].content"),
        (chat, {"json": {"messages": [_user()], "max_tokens": 65}}, 400, "max_tokens"),
        (chat, {"json": {"messages": [_user()], "retrieval": {"k": 6}}}, 400, "retrieval.k"),
        (chat, {"json": {"messages": [_user()], "retrieval": {"pool": 11}}}, 400, "retrieval.pool"),
        ("/v1/search", {"json": {"text": "x", "k": 6}}, 400, "k"),
        ("/v1/search", {"json": {"text": "x", "pool": 11}}, 400, "pool"),
        ("/v1/ask", {"data": {"question": "x"}, "files": [("image", ("a.png", small, "image/png"))] * 3}, 400, None),
        ("/v1/ask", {"data": {"question": "x"}, "files": [("image", ("a.png", big, "image/png"))]}, 413, None),
        ("/v1/ask", {"data": {"question": "x" * 501}}, 400, "question"),
    ]
    async with make_client(**REAL_LIMITS) as client:
        for path, kwargs, status, param in cases:
            response = await client.post(path, **kwargs)
            assert response.status_code == status, (path, param, response.text[:300])
            error = response.json()["error"]
            assert error["message"] and error["type"] == "invalid_request_error"
            if param is not None:
                assert error["param"] is not None and error["param"].startswith(param), error
        ok = await client.post(chat, json={"messages": [_user(*[_image_part(small)] * 2)], "max_tokens": 64})
    assert ok.status_code == 200, ok.text
