"""The HTTP API over ASGI: real knowledge base (embedded Qdrant, tiny CLIP), scripted vLLM transport."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from server.app import STATIC_DIR
from tests.support.fake_vllm import FakeVLLM
from tests.support.fixtures_retriever import make_sample_images
from tests.support.fixtures_server import ingest_samples
from tests.support.media import data_url, png_bytes, sse_events

PNG = png_bytes(make_sample_images(1)[0])


def user(text: str, *images: str) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": text}]
    content += [{"type": "image_url", "image_url": {"url": url}} for url in images]
    return {"role": "user", "content": content}


def assert_error(response: httpx.Response, status: int, type_: str | None = None, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text
    if type_:
        assert body["error"]["type"] == type_
    if param:
        assert body["error"]["param"] == param
    return body["error"]


@pytest.fixture
async def ids(knowledge_base) -> list[str]:
    return await ingest_samples(knowledge_base)


def final_user_parts(body: dict[str, Any]) -> list[dict[str, Any]]:
    return body["messages"][-1]["content"]


# --- chat completions ----------------------------------------------------------------------------
async def test_chat_answers_with_sources_and_usage(client, ids, fake_vllm: FakeVLLM) -> None:
    history = [{"role": "system", "content": "Answer like a pirate."},
               {"role": "user", "content": "hello"}, {"role": "assistant", "content": "ahoy"},
               user("what pattern is on the card?", data_url(PNG))]
    r = await client.post("/v1/chat/completions", json={"model": "vlmrag", "messages": history,
                                                        "temperature": 0.2, "max_tokens": 50})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == fake_vllm.answer
    usage = body["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == usage["total_tokens"] > 0
    kept = [s for s in body["sources"] if s["kept"]]
    assert [s["index"] for s in kept] == list(range(1, len(kept) + 1)) and 1 <= len(kept) <= 3
    assert {s["id"] for s in body["sources"]} <= set(ids)
    assert all(s["index"] is None and s["reason"] for s in body["sources"] if not s["kept"])
    assert {"embed", "search", "rerank", "prompt", "generate", "total"} <= set(body["timings"])

    sent = fake_vllm.answer_bodies[-1]
    assert sent["model"] == "tiny-vlm" and sent["temperature"] == 0.2 and sent["max_tokens"] == 50
    roles = [m["role"] for m in sent["messages"]]
    assert roles == ["system", "user", "assistant", "user"]  # history kept, caller's system folded in
    assert "Answer like a pirate." in sent["messages"][0]["content"]
    parts = final_user_parts(sent)
    images = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
    kept_images = [s for s in kept if s["image_url"]]
    assert len(images) == len(kept_images) + 1  # snippet images + the user's photo, last
    assert all(u.startswith("data:image/") for u in images) and images[-1] == data_url(PNG)
    text = "".join(p.get("text", "") for p in parts)
    assert text.index("<context>") < text.index("Question:") < text.index("what pattern is on the card?")


async def test_chat_stream_relays_tokens_and_ends_with_sources_then_done(client, ids, fake_vllm) -> None:
    r = await client.post("/v1/chat/completions",
                          json={"messages": [user("warranty of the bike?")], "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == fake_vllm.answer
    final = chunks[-1]
    assert final["choices"] == [] and final["sources"] and final["usage"]["total_tokens"] > 0
    assert {s["id"] for s in final["sources"]} <= set(ids)
    assert {"first_token", "generate", "total"} <= set(final["timings"])
    assert fake_vllm.answer_bodies[-1]["stream_options"] == {"include_usage": True}


async def test_retrieval_options_k_filters_and_disabled(client, ids, fake_vllm) -> None:
    r = await client.post("/v1/chat/completions", json={
        "messages": [user("bike warranty")], "retrieval": {"k": 1, "filters": {"source": "faq.txt"}}})
    sources = r.json()["sources"]
    assert [s["source"] for s in sources] == ["faq.txt"] and sources[0]["kept"]

    r = await client.post("/v1/chat/completions", json={
        "messages": [user("bike warranty")], "retrieval": {"k": 2, "filters": {"kind": ["image_text"]}}})
    sources = r.json()["sources"]
    assert sum(s["kept"] for s in sources) == 2 and {s["kind"] for s in sources} == {"image_text"}

    r = await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "just chat"}], "retrieval": {"enabled": False}})
    assert r.status_code == 200 and r.json()["sources"] == []
    assert fake_vllm.answer_bodies[-1]["messages"] == [{"role": "user", "content": "just chat"}]


async def test_operator_extra_body_reaches_vllm_under_the_callers_fields(ids, fake_vllm, make_client) -> None:
    extra = {"top_k": 20, "repetition_penalty": 1.05, "temperature": 0.9}
    async with make_client(vllm_extra_body=extra) as c:
        r = await c.post("/v1/chat/completions", json={"messages": [user("bike warranty")], "temperature": 0.1})
    assert r.status_code == 200
    sent = fake_vllm.answer_bodies[-1]
    assert sent["top_k"] == 20 and sent["repetition_penalty"] == 1.05
    assert sent["temperature"] == 0.1  # the caller's own field wins over the operator default


async def test_nothing_kept_says_no_relevant_context(client, ids, fake_vllm) -> None:
    r = await client.post("/v1/chat/completions", json={
        "messages": [user("anything")], "retrieval": {"threshold": 1.0}})
    body = r.json()
    assert body["sources"] and not any(s["kept"] for s in body["sources"])
    assert {s["reason"] for s in body["sources"]} == {"below_threshold"}
    text = final_user_parts(fake_vllm.answer_bodies[-1])[0]["text"]
    assert "No relevant context was found" in text and "<snippet" not in text


async def test_vlm_scorer_scores_through_the_model(client, ids, fake_vllm) -> None:
    fake_vllm.yes_logprob = -0.05
    r = await client.post("/v1/search", json={"text": "checkerboard", "reranker": "vlm", "pool": 4, "k": 2})
    body = r.json()
    assert body["scorer"] == "vlm" and body["degraded"] == []
    assert all(abs(c["relevancy"] - 0.951) < 0.01 for c in body["candidates"])
    assert sum(1 for b in fake_vllm.chat_bodies if b.get("logprobs")) == 4


async def test_rerank_failure_degrades_not_fails(client, ids, fake_vllm) -> None:
    fake_vllm.rerank_failures = [500] * 50
    r = await client.post("/v1/chat/completions", json={
        "messages": [user("checkerboard")], "retrieval": {"scorer": "vlm", "pool": 3}})
    assert r.status_code == 200, r.text
    assert r.json()["degraded"] == ["rerank"]
    assert r.json()["choices"][0]["message"]["content"] == fake_vllm.answer


# --- errors --------------------------------------------------------------------------------------
BAD_CHAT_REQUESTS = [
    ({}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, None),
    ({"messages": [{"role": "assistant", "content": "x"}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 999_999}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "retrieval": {"k": 500}}, 400, "retrieval.k"),
    ({"messages": [{"role": "user", "content": "x"}], "retrieval": {"bogus": 1}}, 400, None),
    ({"messages": [user("x", "https://example.com/cat.png")]}, 400, "messages[0].content[1].image_url"),
    ({"messages": [user("x", data_url(PNG[:60]))]}, 422, "messages[0].content[1].image_url"),
    ({"messages": [user("x", "data:text/plain;base64,AAAA")]}, 415, None),
    ({"messages": [user("x", "data:image/png;base64,AAAA")]}, 415, None),
    ({"messages": [user("x", *[data_url(PNG)] * 5)]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x" * 20_001}]}, 400, "messages[0].content"),
]


async def test_bad_chat_requests_are_4xx_openai_errors(client, fake_vllm) -> None:
    # one app for all cases (a loop, not parametrize): building a knowledge base costs ~0.5 s
    for payload, status, param in BAD_CHAT_REQUESTS:
        r = await client.post("/v1/chat/completions", json=payload)
        assert_error(r, status, param=param)
    assert fake_vllm.answer_bodies == []  # nothing reached the model


async def test_malformed_json_and_unknown_route(client) -> None:
    r = await client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert assert_error(r, 400, "invalid_request_error")["code"] == "invalid_json"
    assert_error(await client.get("/v1/nope"), 404, "not_found_error")
    assert_error(await client.delete("/v1/models"), 405)


async def test_vllm_down_is_503_with_retry_after_even_when_streaming(client, ids, fake_vllm) -> None:
    for stream in (False, True):
        fake_vllm.failures = [httpx.ConnectError("refused"), 503]  # settings: 2 attempts
        r = await client.post("/v1/chat/completions", json={"messages": [user("hi")], "stream": stream})
        err = assert_error(r, 503, "service_unavailable")
        assert err["code"] == "model_unavailable" and int(r.headers["retry-after"]) >= 1
    fake_vllm.failures = [503]  # one transient failure: the retry answers
    r = await client.post("/v1/chat/completions", json={"messages": [user("hi")], "stream": True})
    assert r.status_code == 200 and sse_events(r.text)[-1] == "[DONE]"


async def test_garbage_from_vllm_is_502(client, ids, fake_vllm) -> None:
    fake_vllm.garbage = b"<html>proxy error</html>"
    r = await client.post("/v1/chat/completions", json={"messages": [user("hi")]})
    assert_error(r, 502, "upstream_error")


async def test_mid_stream_failure_is_one_error_event_then_done(client, ids, fake_vllm) -> None:
    fake_vllm.answer = "one two three four"
    fake_vllm.break_stream_after = 2
    r = await client.post("/v1/chat/completions", json={"messages": [user("hi")], "stream": True})
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    errors = [e for e in events if isinstance(e, dict) and "error" in e]
    assert len(errors) == 1 and events[-2] is errors[0]
    assert errors[0]["error"]["code"] == "model_unavailable"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2] if e.get("choices"))
    assert text == "one two"


async def test_unexpected_exception_is_generic_500_without_trace(client, knowledge_base, monkeypatch) -> None:
    async def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(knowledge_base, "search", boom)
    r = await client.post("/v1/search", json={"text": "x"})
    err = assert_error(r, 500, "server_error")
    assert "secret" not in r.text and err["code"] == "internal_error"


# --- ask, search -----------------------------------------------------------------------------------
async def test_ask_multipart_with_image(client, ids, fake_vllm) -> None:
    r = await client.post("/v1/ask", data={"question": "what is this?", "k": "2"},
                          files=[("image", ("photo.png", PNG, "image/png"))])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["answer"] == fake_vllm.answer and sum(s["kept"] for s in body["sources"]) == 2
    assert {"decode", "embed", "search", "rerank", "prompt", "generate", "total"} <= set(body["timings"])
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    parts = final_user_parts(fake_vllm.answer_bodies[-1])
    assert parts[-1]["image_url"]["url"] == data_url(PNG)  # the real media type, not the filename's

    r = await client.post("/v1/ask", data={"question": "what is this?", "stream": "true"})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and events[-2]["sources"]


async def test_ask_errors(client, ids) -> None:
    assert_error(await client.post("/v1/ask", data={}), 400)  # no question, no image
    r = await client.post("/v1/ask", data={"question": "q"}, files=[("image", ("a.png", b"GIF87a" + b"\0" * 10, "image/png"))])
    assert r.status_code in (415, 422) and "error" in r.json()
    r = await client.post("/v1/ask", data={"question": "q"}, files=[("image", ("a.tif", b"II*\x00" + b"\0" * 20, "image/tiff"))])
    assert_error(r, 415)
    assert_error(await client.post("/v1/ask", data={"question": "q", "k": "0"}), 400, param="k")


async def test_search_text_and_image(client, ids) -> None:
    r = await client.post("/v1/search", json={"text": "a black and white checkerboard", "k": 2, "pool": 6})
    body = r.json()
    assert r.status_code == 200 and len(body["candidates"]) == 6
    assert sum(c["kept"] for c in body["candidates"]) == 2
    first = body["candidates"][0]
    assert first["kept"] and first["text"] == "a black and white checkerboard"
    assert {"clip_score", "vector_scores", "relevancy", "reason", "image_url"} <= set(first)
    assert {"embed", "search", "rerank", "total"} <= set(body["timings"])

    r = await client.post("/v1/search", json={"image": data_url(PNG), "k": 1, "reranker": "none"})
    body = r.json()
    assert body["scorer"] == "none" and body["candidates"][0]["vector_scores"]["image->image"] > 0.99

    assert_error(await client.post("/v1/search", json={}), 400)
    assert_error(await client.post("/v1/search", json={"text": "x", "pool": 10_000}), 400, param="pool")


# --- snippets, stats -----------------------------------------------------------------------------
async def test_snippet_lifecycle(client) -> None:
    form = {"text": "a tiny red square", "source": "manual.pdf", "tags": ["a", "b"]}
    r = await client.post("/v1/snippets", data=form, files={"image": ("sq.png", PNG, "image/png")})
    assert r.status_code == 201, r.text
    created = r.json()
    sid = created["id"]
    assert created["created"] and created["snippet"]["tags"] == ["a", "b"]
    again = await client.post("/v1/snippets", data=form, files={"image": ("sq.png", PNG, "image/png")})
    assert again.status_code == 200 and again.json() == {**created, "created": False}
    await client.post("/v1/snippets", data={"text": "text only", "source": "notes.txt"})

    listing = (await client.get("/v1/snippets", params={"limit": 1})).json()
    assert len(listing["items"]) == 1 and listing["next_offset"]
    page2 = (await client.get("/v1/snippets", params={"limit": 1, "offset": listing["next_offset"]})).json()
    assert len({listing["items"][0]["id"], page2["items"][0]["id"]}) == 2
    only = (await client.get("/v1/snippets", params={"source": "notes.txt"})).json()["items"]
    assert [i["text"] for i in only] == ["text only"]

    info = (await client.get(f"/v1/snippets/{sid}")).json()
    image = await client.get(info["image_url"])
    assert image.content == PNG and image.headers["content-type"] == "image/png"
    thumb = await client.get(info["thumbnail_url"])
    assert thumb.headers["content-type"] == "image/jpeg" and thumb.content[:3] == b"\xff\xd8\xff"

    stats = (await client.get("/v1/stats")).json()
    assert stats["count"] == 2 and stats["by_source"] == {"manual.pdf": 1, "notes.txt": 1}
    assert (await client.delete(f"/v1/snippets/{sid}")).json() == {"id": sid, "deleted": True}
    assert_error(await client.get(f"/v1/snippets/{sid}"), 404)
    assert_error(await client.delete(f"/v1/snippets/{sid}"), 404)
    assert_error(await client.post("/v1/snippets", data={"source": "x"}), 400)
    assert_error(await client.post("/v1/snippets", files={"image": ("x.bmp", b"BM" + b"\0" * 40, "image/bmp")}), 415)


# --- models, health, metrics, pages, auth ----------------------------------------------------------
async def test_models_health_readiness_recovers(client, fake_vllm) -> None:
    assert (await client.get("/v1/models")).json()["data"][0]["id"] == "vlmrag"
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).status_code == 200
    fake_vllm.down = True
    r = await client.get("/readyz")
    assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["code"] == "not_ready"
    assert r.json()["checks"]["vllm"] == {"http://vllm.test:8000": "ConnectError"}
    fake_vllm.down = False
    assert (await client.get("/readyz")).status_code == 200


async def test_metrics_by_stage_route_tokens_errors(client, ids) -> None:
    await client.post("/v1/chat/completions", json={"messages": [user("hi")]})
    await client.post("/v1/chat/completions", json={})
    text = (await client.get("/metrics")).text
    for stage in ("embed", "search", "rerank", "generate"):
        assert f'vlmrag_stage_seconds_count{{stage="{stage}"}}' in text
    assert 'route="/v1/chat/completions"' in text
    assert 'vlmrag_tokens_total{kind="completion"}' in text
    assert 'vlmrag_errors_total{status="400",type="invalid_request_error"}' in text


async def test_pages_and_static(client) -> None:
    if not (STATIC_DIR / "index.html").exists():
        pytest.skip("web pages not installed")
    r = await client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert (await client.get("/static/index.html")).status_code == 200


async def test_routes_require_their_scope(make_client) -> None:
    keys = "chat:chat-key-0123456789abcdef,admin:admin-key-0123456789abcdef"
    async with make_client(auth_disabled=False, api_keys=keys) as c:
        assert_error(await c.get("/v1/models"), 401)
        chat = {"Authorization": "Bearer chat-key-0123456789abcdef"}
        assert (await c.get("/v1/models", headers=chat)).status_code == 200
        assert_error(await c.get("/v1/stats", headers=chat), 403)
        assert_error(await c.delete("/v1/snippets/x", headers=chat), 403)
        admin = {"Authorization": "Bearer admin-key-0123456789abcdef"}
        assert (await c.get("/v1/stats", headers=admin)).status_code == 200
        assert (await c.get("/healthz")).status_code == 200


# --- images per model prompt (VLMRAG_VLLM_MAX_IMAGES_PER_PROMPT; 4 in the test settings) -----------
def image_count(body: dict[str, Any]) -> int:
    return sum(1 for m in body["messages"] if isinstance(m["content"], list)
               for p in m["content"] if p["type"] == "image_url")


async def test_caller_images_over_the_prompt_cap_are_refused(client, ids, fake_vllm, make_client) -> None:
    history = [user("these?", *[data_url(PNG)] * 3), {"role": "assistant", "content": "stripes"},
               user("and these?", *[data_url(PNG)] * 2)]  # 5 in all: within the per-request limit of 8
    err = assert_error(await client.post("/v1/chat/completions", json={"messages": history}), 400, param="messages")
    assert err["code"] == "too_many_images" and "VLMRAG_VLLM_MAX_IMAGES_PER_PROMPT" in err["message"]
    async with make_client(vllm_max_images_per_prompt=1) as c:
        r = await c.post("/v1/ask", data={"question": "q"},
                         files=[("image", ("a.png", PNG, "image/png")), ("image", ("b.png", PNG, "image/png"))])
        assert assert_error(r, 400, param="image")["code"] == "too_many_images"
    assert fake_vllm.chat_bodies == []  # refused before retrieval, re-ranking or the model


async def test_snippet_images_fill_the_cap_in_rank_order_then_go_as_captions(client, ids, fake_vllm) -> None:
    r = await client.post("/v1/chat/completions", json={
        "messages": [user("which pattern?", data_url(PNG), data_url(PNG))],
        "retrieval": {"k": 4, "filters": {"kind": ["image_text"]}}})
    assert r.status_code == 200, r.text
    kept = [s for s in r.json()["sources"] if s["kept"]]
    assert len(kept) == 4 and all(s["image_url"] for s in kept)
    parts = final_user_parts(fake_vllm.answer_bodies[-1])
    assert image_count(fake_vllm.answer_bodies[-1]) == 4  # 2 snippet images + the caller's 2
    text = "".join(p.get("text", "") for p in parts)
    for n in (1, 2):
        assert f"[{n}] image:" in text and f"[{n}] image: not attached" not in text
    for n, source in ((3, kept[2]), (4, kept[3])):  # past the cap: caption only, with a note
        assert f"[{n}] image: not attached" in text and f"[{n}] caption: {source['text']}" in text
    assert [p["image_url"]["url"] for p in parts if p["type"] == "image_url"][2:] == [data_url(PNG)] * 2


async def test_rerank_requests_stay_within_the_prompt_cap(client, ids, fake_vllm) -> None:
    r = await client.post("/v1/chat/completions", json={
        "messages": [user("which pattern?", *[data_url(PNG)] * 4)],
        "retrieval": {"scorer": "vlm", "k": 2, "pool": 2, "filters": {"kind": ["image_text"]}}})
    assert r.status_code == 200, r.text
    assert r.json()["degraded"] == []
    rerank = [b for b in fake_vllm.chat_bodies if b.get("logprobs")]
    assert len(rerank) == 2 and all(image_count(b) == 4 for b in rerank)  # 3 query images + the candidate's
    answer = fake_vllm.answer_bodies[-1]
    assert image_count(answer) == 4  # the caller's four: no room for snippet images
    assert "[1] image: not attached" in "".join(p.get("text", "") for p in final_user_parts(answer))


async def test_remote_image_refused_has_a_code_and_fetched_ones_reach_the_model_inline(
    client, ids, fake_vllm, make_client, monkeypatch
) -> None:
    url = "https://images.example.com/cat.png"
    err = assert_error(await client.post("/v1/search", json={"image": url}), 400, param="image")
    assert err["code"] == "remote_image_refused" and "VLMRAG_REMOTE_IMAGES_ENABLED" in err["message"]

    async def fetched(u: str, settings: Any, remote: Any) -> bytes:  # the fetcher is tested on its own
        return PNG if u == url else b""

    monkeypatch.setattr("server.services.chat.image_bytes_from_url", fetched)
    async with make_client(remote_images_enabled=True, remote_image_hosts=["images.example.com"]) as c:
        r = await c.post("/v1/chat/completions", json={"messages": [user("what is this?", url)]})
        assert r.status_code == 200, r.text
    urls = [p["image_url"]["url"] for p in final_user_parts(fake_vllm.answer_bodies[-1]) if p["type"] == "image_url"]
    assert urls[-1] == data_url(PNG) and url not in json.dumps(fake_vllm.answer_bodies[-1])


async def test_search_accepts_scorer_alias_and_min_k_on_search_and_ask(client, ids) -> None:
    r = await client.post("/v1/search", json={"text": "checkerboard", "scorer": "none", "k": 1})
    assert r.status_code == 200, r.text
    assert r.json()["scorer"] == "none"
    r = await client.post("/v1/search", json={"text": "checkerboard", "scorer": "clip", "reranker": "clip"})
    assert r.status_code == 200 and r.json()["scorer"] == "clip"
    assert_error(await client.post("/v1/search", json={"text": "x", "scorer": "vlm", "reranker": "clip"}), 400)

    # nothing passes threshold 1.0; min_k keeps the best one anyway
    r = await client.post("/v1/search", json={"text": "zebra", "threshold": 1.0, "min_k": 1, "k": 2, "pool": 4})
    kept = [c for c in r.json()["candidates"] if c["kept"]]
    assert len(kept) == 1 and kept[0]["reason"] == "min_k"
    r = await client.post("/v1/ask", data={"question": "zebra", "threshold": "1.0", "min_k": "1", "k": "2"})
    assert r.status_code == 200, r.text
    assert [s["reason"] for s in r.json()["sources"] if s["kept"]] == ["min_k"]
