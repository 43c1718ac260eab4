"""The MCP server at /mcp through the official ``mcp`` client, against vlmrag under real uvicorn (auth on,
keys bound to knowledge bases, the scripted vLLM behind it): tools, images, keys, tenants, limits, errors.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import httpx
import mcp_types as types
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mcp.shared.exceptions import MCPError

from server.app import create_app
from tests.support.fixtures_mcp import ADMIN_KEY, DEFAULT_KEY, PUMP_TEXT, PUMPS_KEY, McpServer, mcp_session
from tests.support.fixtures_retriever import make_sample_images
from tests.support.media import data_url, png_bytes

pytestmark = pytest.mark.subprocess  # a real uvicorn in a thread

TOOLS = {"search", "fetch", "list_knowledge_bases", "ask"}
ERROR_TYPES = {"invalid_request_error", "not_found_error", "rate_limit_error"}


def text_of(result: types.CallToolResult) -> str:
    first = result.content[0]
    assert isinstance(first, types.TextContent)
    return first.text


def json_of(result: types.CallToolResult) -> dict[str, Any]:
    assert not result.is_error, text_of(result)
    data = json.loads(text_of(result))
    assert data == result.structured_content  # the text is the JSON of the structured content
    return data


def images_of(result: types.CallToolResult) -> list[types.ImageContent]:
    return [c for c in result.content if isinstance(c, types.ImageContent)]


def error_of(result: types.CallToolResult) -> dict[str, Any]:
    assert result.is_error, f"expected a tool error, got {text_of(result)[:200]}"
    assert result.structured_content is not None
    return result.structured_content["error"]


async def test_lists_the_tools_and_names_the_keys_knowledge_bases(mcp_server: McpServer) -> None:
    async with mcp_session(mcp_server.mcp_url, ADMIN_KEY) as admin:
        tools = {t.name: t for t in (await admin.list_tools()).tools}
    assert set(tools) == TOOLS
    assert "`pumps` — Pump manuals" in (tools["search"].description or "")
    assert tools["search"].input_schema["required"] == ["query"]
    assert all(t.annotations and t.annotations.read_only_hint for t in tools.values())
    async with mcp_session(mcp_server.mcp_url, PUMPS_KEY) as pumps:
        descriptions = [t.description or "" for t in (await pumps.list_tools()).tools]
    assert any("`pumps`" in d for d in descriptions)
    assert not any("`default`" in d for d in descriptions)  # another tenant's KB is never named


async def test_search_returns_connector_results_with_thumbnails(mcp_server: McpServer) -> None:
    async with mcp_session(mcp_server.mcp_url, DEFAULT_KEY) as session:
        result = await session.call_tool("search", {"query": "a warm yellow card", "k": 3})
    data = json_of(result)
    results = data["results"]
    assert 1 <= len(results) <= 3 and data["kb"] == "default"
    assert {"id", "title", "url", "text"} <= results[0].keys()
    assert all(r["id"].startswith("default:") and r["url"].startswith(mcp_server.url + "/v1/snippets/")
               for r in results)
    images = images_of(result)
    with_image = [r for r in results if r["image"]]
    assert with_image and len(images) == len(with_image)
    with mcp_server.rest(DEFAULT_KEY) as rest:
        for r, image in zip(with_image, images):
            assert (image.meta or {})["vlmrag/id"] == r["id"] and image.mime_type == "image/jpeg"
            stored = rest.get(f"/v1/snippets/{r['id'].split(':', 1)[1]}/thumbnail")
            assert base64.b64decode(image.data) == stored.content  # the stored thumbnail, byte for byte


async def test_search_takes_an_image_as_a_data_url(mcp_server: McpServer) -> None:
    image = data_url(png_bytes(make_sample_images(4)[2]))
    async with mcp_session(mcp_server.mcp_url, DEFAULT_KEY) as session:
        data = json_of(await session.call_tool("search", {"query": "", "image": image}))
    assert data["results"]


async def test_fetch_returns_the_whole_snippet(mcp_server: McpServer) -> None:
    async with mcp_session(mcp_server.mcp_url, PUMPS_KEY) as session:
        found = json_of(await session.call_tool("search", {"query": "pump error E-417"}))
        doc = json_of(await session.call_tool("fetch", {"id": found["results"][0]["id"]}))
    assert doc["id"] == f"pumps:{mcp_server.pump_id}" and doc["text"] == PUMP_TEXT
    assert doc["title"] == "pump-manual.pdf p. 3" and doc["url"].endswith(f"/v1/snippets/{mcp_server.pump_id}?kb=pumps")
    assert doc["metadata"] | {"created_at": ""} == {
        "kb": "pumps", "kind": "text", "source": "pump-manual.pdf", "page": 3, "tags": ["manual"], "ocr_text": "",
        "created_at": "", "image_url": None, "thumbnail_url": None}
    async with mcp_session(mcp_server.mcp_url, DEFAULT_KEY) as session:
        photo = await session.call_tool("fetch", {"id": mcp_server.default_ids[1]})  # a bare id: the key's KB
    assert json_of(photo)["text"] == "green stripes on black"
    (image,) = images_of(photo)
    with mcp_server.rest(DEFAULT_KEY) as rest:
        assert base64.b64decode(image.data) == rest.get(f"/v1/snippets/{mcp_server.default_ids[1]}/thumbnail").content


async def test_list_knowledge_bases_names_only_the_keys_own(mcp_server: McpServer) -> None:
    async with mcp_session(mcp_server.mcp_url, ADMIN_KEY) as admin:
        every = json_of(await admin.call_tool("list_knowledge_bases", {}))["knowledge_bases"]
    assert [(k["name"], k["display_name"], k["default"]) for k in every] == [
        ("default", "Default", True), ("pumps", "Pump manuals", False)]
    async with mcp_session(mcp_server.mcp_url, PUMPS_KEY) as pumps:
        own = json_of(await pumps.call_tool("list_knowledge_bases", {}))["knowledge_bases"]
    assert [k["name"] for k in own] == ["pumps"] and own[0]["default"] is True


async def test_ask_answers_with_numbered_citations(mcp_server: McpServer) -> None:
    image = data_url(png_bytes(make_sample_images(4)[3]))
    before = len(mcp_server.fake_vllm.answer_bodies)
    async with mcp_session(mcp_server.mcp_url, DEFAULT_KEY) as session:
        result = await session.call_tool("ask", {"question": "What colour is the card?", "image": image})
    assert not result.is_error, text_of(result)
    data = result.structured_content or {}
    assert data["answer"] == mcp_server.fake_vllm.answer and data["id"].startswith("chatcmpl-")
    assert [c["index"] for c in data["citations"]] == list(range(1, len(data["citations"]) + 1))
    assert text_of(result).startswith(data["answer"] + "\n\nSources:\n[1] ")
    assert len(images_of(result)) == sum(1 for c in data["citations"] if c["title"].startswith("photos/"))
    (body,) = mcp_server.fake_vllm.answer_bodies[before:]
    sent = [p for m in body["messages"] if isinstance(m["content"], list) for p in m["content"]
            if p["type"] == "image_url"]
    assert image in [p["image_url"]["url"] for p in sent]  # the caller's image went to the model


@pytest.mark.parametrize("key,header", [(None, "authorization"), ("not-a-key-at-all-000", "authorization"),
                                        ("not-a-key-at-all-000", "x-api-key")])
async def test_a_missing_or_wrong_key_is_an_auth_error(mcp_server: McpServer, key: str | None, header: str) -> None:
    with pytest.raises(BaseException) as caught:  # the client raises it out of its task groups
        async with mcp_session(mcp_server.mcp_url, key, header=header) as session:
            await session.list_tools()
    error = _leaf(caught.value)
    assert isinstance(error, MCPError) and error.error.data["status"] == 401
    assert error.error.data["type"] == "authentication_error"


async def test_the_x_api_key_header_works_too(mcp_server: McpServer) -> None:
    async with mcp_session(mcp_server.mcp_url, PUMPS_KEY, header="x-api-key") as session:
        assert json_of(await session.call_tool("list_knowledge_bases", {}))["knowledge_bases"][0]["name"] == "pumps"


async def test_another_tenants_knowledge_base_and_snippet_are_not_found(mcp_server: McpServer) -> None:
    photo = mcp_server.default_ids[0]
    async with mcp_session(mcp_server.mcp_url, PUMPS_KEY) as session:
        other_kb = error_of(await session.call_tool("search", {"query": "card", "kb": "default"}))
        unknown_kb = error_of(await session.call_tool("search", {"query": "card", "kb": "nope"}))
        other_snippet = error_of(await session.call_tool("fetch", {"id": f"default:{photo}"}))
        in_own_kb = error_of(await session.call_tool("fetch", {"id": f"pumps:{photo}"}))
        bare = error_of(await session.call_tool("fetch", {"id": photo}))
        asked = error_of(await session.call_tool("ask", {"question": "card?", "kb": "default"}))
    assert other_kb["message"] == "no knowledge base 'default'" and unknown_kb["message"] == "no knowledge base 'nope'"
    assert {other_kb["type"], unknown_kb["type"], other_snippet["type"], in_own_kb["type"], bare["type"],
            asked["type"]} == {"not_found_error"}
    with mcp_server.rest(PUMPS_KEY) as rest:  # exactly REST's answers
        refused = rest.post("/v1/search", params={"kb": "default"}, json={"text": "card"})
        assert refused.status_code == 404 and refused.json()["error"]["message"] == other_kb["message"]
        assert rest.get(f"/v1/snippets/{photo}", params={"kb": "default"}).json()["error"]["message"] == \
            other_snippet["message"]
        assert rest.get(f"/v1/snippets/{photo}").json()["error"]["message"] == in_own_kb["message"] == bare["message"]


async def test_over_limit_arguments_are_tool_errors_and_the_session_goes_on(mcp_server: McpServer) -> None:
    s = mcp_server.settings
    too_big = data_url(b"\x89PNG" + b"0" * s.limit_image_bytes)
    async with mcp_session(mcp_server.mcp_url, DEFAULT_KEY) as session:
        long_query = error_of(await session.call_tool("search", {"query": "x" * (s.limit_message_chars + 1)}))
        big_k = error_of(await session.call_tool("search", {"query": "card", "k": s.limit_k + 1}))
        long_question = error_of(await session.call_tool("ask", {"question": "y" * (s.limit_message_chars + 1)}))
        big_image = error_of(await session.call_tool("search", {"query": "card", "image": too_big}))
        still_fine = await session.call_tool("search", {"query": "card"})
    assert (long_query["code"], long_query["param"]) == ("message_too_long", "text")
    assert (big_k["code"], big_k["param"]) == ("limit_exceeded", "k")
    assert long_question["code"] == "message_too_long" and long_question["param"] == "question"
    assert big_image["param"] == "image" and "limit" in big_image["message"]
    assert json_of(still_fine)["results"]


BAD_ARGUMENTS = [  # (tool, arguments, the error's param, a phrase of its message)
    ("search", {}, "query", "Field required"),
    ("search", {"query": 5}, "query", "valid string"),
    ("search", {"query": ["a"]}, "query", "valid string"),
    ("search", {"query": "card", "k": "five"}, "k", "valid integer"),
    ("search", {"query": "card", "k": 0}, "k", "greater than or equal to 1"),
    ("search", {"query": "card", "k": 10**30}, "k", "limit"),
    ("search", {"query": "card", "kb": 3}, "kb", "valid string"),
    ("search", {"query": "card", "kb": "k" * 49}, "kb", "at most 48"),
    ("search", {"query": "card", "kb": "Not A Name!"}, None, "no knowledge base"),
    ("search", {"query": "card", "colour": "red"}, "colour", "Extra inputs"),
    ("search", {"query": "   "}, "messages", "nothing to search for"),
    ("search", {"query": "card", "image": "data:image/png;base64,!!!not-base64"}, "image", "base64"),
    ("search", {"query": "card", "image": "data:text/plain;base64,aGVsbG8="}, "image", "is not an image"),
    ("search", {"query": "card", "image": "data:image/png;base64,aGVsbG8="}, "image", "not a recognised image format"),
    ("search", {"query": "card", "image": "http://example.com/card.png"}, "image", "remote image URLs are disabled"),
    ("search", {"query": "card", "image": "file:///etc/passwd"}, "image", "must be a data:image"),
    ("fetch", {}, "id", "Field required"),
    ("fetch", {"id": ""}, "id", "at least 1"),
    ("fetch", {"id": "i" * 201}, "id", "at most 200"),
    ("fetch", {"id": "default:not-a-uuid"}, None, "no snippet"),
    ("fetch", {"id": "nope:00000000-0000-0000-0000-000000000000"}, None, "no knowledge base"),
    ("ask", {"question": None}, "question", "valid string"),
    ("ask", {"question": "why?", "image": "data:image/gif;base64,R0lGODlh"}, "image", "corrupt"),
    ("list_knowledge_bases", {"kb": "default"}, "kb", "Extra inputs"),
    ("no_such_tool", {}, "name", "unknown tool"),
]


@pytest.mark.parametrize("tool,arguments,param,phrase", BAD_ARGUMENTS,
                         ids=[f"{t}-{'-'.join(map(str, a)) or 'none'}"[:60] for t, a, _, _ in BAD_ARGUMENTS])
async def test_bad_arguments_are_clear_tool_errors(
    mcp_server: McpServer, tool: str, arguments: dict[str, Any], param: str | None, phrase: str,
) -> None:
    async with mcp_session(mcp_server.mcp_url, DEFAULT_KEY) as session:
        error = error_of(await session.call_tool(tool, arguments))
    assert error["type"] in ERROR_TYPES and phrase in error["message"]
    if param is not None:
        assert error["param"] == param


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=8)
WEIRD_STRINGS = st.one_of(
    st.text(max_size=200),
    st.sampled_from(["data:", "data:image/png;base64,", "data:image/png,raw", "data:;base64,AAAA",
                     "http://127.0.0.1:9/x.png", "default:", ":", "pumps:" + "0" * 36]),
    st.integers(20_001, 40_000).map(lambda n: "z" * n),  # over limit_message_chars
)
ARGUMENT = st.one_of(JSON, WEIRD_STRINGS)


@settings(max_examples=40, deadline=None)
@given(tool=st.sampled_from(sorted(TOOLS)), arguments=st.dictionaries(
    st.sampled_from(["query", "kb", "k", "image", "id", "question", "extra"]), ARGUMENT, max_size=4))
async def test_any_arguments_get_a_result_or_a_clear_tool_error(
    mcp_server: McpServer, tool: str, arguments: dict[str, Any],
) -> None:
    async with mcp_session(mcp_server.mcp_url, DEFAULT_KEY) as session:
        result = await session.call_tool(tool, arguments)  # never a protocol error: an MCPError would raise here
    if result.is_error:
        error = error_of(result)
        assert error["type"] in ERROR_TYPES and error["message"] and "internal error" not in error["message"]
    else:
        assert result.structured_content is not None


RAW_REQUESTS = [  # (method, body, content type, status): what a client that is not an MCP client may send
    ("GET", None, None, 405),  # stateless with JSON responses: no standalone SSE stream to open
    ("DELETE", None, None, 405),  # no sessions to end
    ("POST", b"not json", "application/json", 400),
    ("POST", b"[1, 2]", "application/json", 400),
    ("POST", b"{}", "text/plain", 400),
    ("POST", b'{"jsonrpc": "2.0", "id": 1, "method": "no/such"}', "application/json", 200),  # JSON-RPC error
]


@pytest.mark.parametrize("method,body,content_type,status", RAW_REQUESTS)
def test_raw_http_gets_a_4xx_or_a_json_rpc_error_never_a_hang(
    mcp_server: McpServer, method: str, body: bytes | None, content_type: str | None, status: int,
) -> None:
    headers = {"Authorization": f"Bearer {DEFAULT_KEY}", "Accept": "application/json, text/event-stream"}
    if content_type:
        headers["Content-Type"] = content_type
    response = httpx.request(method, mcp_server.mcp_url, content=body, headers=headers, timeout=10)
    assert response.status_code == status, response.text[:300]
    if status == 200:
        assert response.json()["error"]["code"] == -32601


def test_a_browser_origin_outside_cors_origins_is_refused(mcp_server: McpServer) -> None:
    """The MCP spec's DNS-rebinding guard: a page on another origin cannot drive /mcp with a local key."""
    ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    headers = {"Authorization": f"Bearer {DEFAULT_KEY}", "Accept": "application/json, text/event-stream"}
    refused = httpx.post(mcp_server.mcp_url, json=ping, headers={**headers, "Origin": "http://evil.example"}, timeout=10)
    assert refused.status_code == 403 and refused.json()["error"]["data"]["code"] == "origin_refused"
    assert httpx.post(mcp_server.mcp_url, json=ping, headers=headers, timeout=10).json()["result"] == {}


async def test_rate_limits_apply_per_tool_call(settings: Any, knowledge_base: Any, fake_vllm: Any) -> None:
    """Over the key's burst a call is a rate-limit tool error with retry_after (in-process app, its own limits)."""
    import httpx2

    limited = settings.model_copy(update={"rate_limit_rps": 0.01, "rate_limit_burst": 2})
    app = create_app(limited, knowledge_base=knowledge_base, vllm_transport=httpx.MockTransport(fake_vllm))
    async with app.router.lifespan_context(app):
        from mcp import ClientSession
        from mcp.client.streamable_http import streamable_http_client

        async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://testserver") as http, \
                streamable_http_client("http://testserver/mcp", http_client=http) as (read, write, *_), \
                ClientSession(read, write) as session:
            await session.initialize()
            await session.list_tools()  # listing is free: only tool calls are charged
            first = [await session.call_tool("list_knowledge_bases", {}) for _ in range(2)]
            third = error_of(await session.call_tool("search", {"query": "card"}))
    assert not any(r.is_error for r in first)
    assert third["type"] == "rate_limit_error" and third["retry_after"] >= 1


async def test_tool_calls_are_counted_and_mcp_never_answered_a_5xx(mcp_server: McpServer) -> None:
    async with mcp_session(mcp_server.mcp_url, DEFAULT_KEY) as session:
        await session.call_tool("list_knowledge_bases", {})
        await session.call_tool("fetch", {"id": "default:00000000-0000-0000-0000-000000000000"})
    with mcp_server.rest(ADMIN_KEY) as rest:
        metrics = rest.get("/metrics").text
    assert _sample(metrics, 'vlmrag_mcp_tool_calls_total{outcome="ok",tool="list_knowledge_bases"}') >= 1
    assert _sample(metrics, 'vlmrag_mcp_tool_calls_total{outcome="not_found_error",tool="fetch"}') >= 1
    assert _sample(metrics, 'vlmrag_mcp_tool_seconds_count{tool="fetch"}') >= 1
    statuses = set(re.findall(r'vlmrag_request_seconds_count\{method="POST",route="/mcp",status="(\d+)"\}', metrics))
    assert statuses and not {s for s in statuses if s.startswith("5")}, statuses


def _sample(metrics: str, name: str) -> float:
    match = re.search(re.escape(name) + r" ([0-9.e+]+)", metrics)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc
