"""vlmrag under real uvicorn, answering through the real tiny vLLM, driven by the real ``openai`` SDK.

Checks protocol and plumbing, not wisdom (the model has random weights): answers arrive, sources
point at ingested snippets, usage adds up, streams end with ``[DONE]``, images reach vLLM.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.support.fixtures_retriever import make_sample_images
from tests.support.fixtures_server import LiveServer
from tests.support.media import data_url, png_bytes

pytestmark = pytest.mark.e2e

PHOTO = png_bytes(make_sample_images(3)[2])
FEW_TOKENS = 8  # random weights: keep generations short


@pytest.fixture(scope="module")
def sdk(live_server: LiveServer) -> OpenAI:
    return OpenAI(base_url=live_server.base_url, api_key="not-needed-auth-off", max_retries=0, timeout=120)


def image_message(text: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": text},
                                        {"type": "image_url", "image_url": {"url": data_url(PHOTO)}}]}


def check_sources(sources: list[dict[str, Any]], live: LiveServer, k: int) -> None:
    assert sources, "no sources"
    assert {s["id"] for s in sources} <= set(live.snippet_ids)
    kept = [s for s in sources if s["kept"]]
    assert 1 <= len(kept) <= k and [s["index"] for s in kept] == list(range(1, len(kept) + 1))
    assert all(0.0 <= s["relevancy"] <= 1.0 for s in sources)


def test_sdk_non_streamed_text(sdk: OpenAI, live_server: LiveServer) -> None:
    resp = sdk.chat.completions.create(
        model="vlmrag", max_tokens=FEW_TOKENS, temperature=0,
        messages=[{"role": "user", "content": "How long is the bike warranty?"}],
        extra_body={"retrieval": {"k": 2, "scorer": "clip"}},
    )
    assert resp.object == "chat.completion" and resp.model == "vlmrag"
    assert isinstance(resp.choices[0].message.content, str)
    assert resp.choices[0].finish_reason in ("stop", "length")
    usage = resp.usage
    assert usage is not None and usage.completion_tokens >= 1
    assert usage.prompt_tokens + usage.completion_tokens == usage.total_tokens
    extra = resp.model_extra or {}
    check_sources(extra["sources"], live_server, 2)
    assert {"embed", "search", "rerank", "prompt", "generate", "total"} <= set(extra["timings"])


def test_sdk_streamed_with_image_part(sdk: OpenAI, live_server: LiveServer) -> None:
    stream = sdk.chat.completions.create(
        model="vlmrag", max_tokens=FEW_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                  image_message("What is on this picture?")],
        extra_body={"retrieval": {"k": 2, "scorer": "clip"}},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert isinstance(text, str)
    final = chunks[-1]
    assert final.choices == [] and final.usage is not None
    assert final.usage.prompt_tokens + final.usage.completion_tokens == final.usage.total_tokens
    assert final.usage.completion_tokens >= 1
    check_sources((final.model_extra or {})["sources"], live_server, 2)
    # the photo is ranked first by CLIP image->image (it is ingested as photos/2.png)
    first = (final.model_extra or {})["sources"][0]
    assert first["source"] == "photos/2.png" and first["kept"]


def test_raw_stream_ends_with_sources_then_done(live_server: LiveServer) -> None:
    body = {"model": "vlmrag", "max_tokens": FEW_TOKENS, "stream": True,
            "messages": [{"role": "user", "content": "checkerboard"}], "retrieval": {"k": 1, "scorer": "clip"}}
    with httpx.stream("POST", f"{live_server.base_url}/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    final = json.loads(lines[-2][6:])
    assert final["sources"] and final["usage"]["total_tokens"] > 0 and "error" not in final


def test_image_reaches_vllm(sdk: OpenAI) -> None:
    """Same conversation with and without the image part: vLLM counts the image's tokens."""

    def prompt_tokens(message: dict[str, Any]) -> int:
        resp = sdk.chat.completions.create(model="vlmrag", max_tokens=1, messages=[message],
                                           extra_body={"retrieval": {"enabled": False}})
        assert resp.usage is not None
        return resp.usage.prompt_tokens

    question = {"type": "text", "text": "What is on this picture?"}
    image = {"type": "image_url", "image_url": {"url": data_url(PHOTO)}}
    counts = [prompt_tokens({"role": "user", "content": [question, *[image] * n]}) for n in range(3)]
    per_image = counts[1] - counts[0]
    # at least <|vision_start|>, one <|image_pad|> and <|vision_end|> per image, the same for each
    assert per_image >= 3 and counts[2] - counts[1] == per_image


def test_ask_multipart_with_vlm_reranker(live_server: LiveServer) -> None:
    form = {"question": "What is on this picture?", "k": "2", "threshold": "0", "pool": "4", "scorer": "vlm",
            "max_tokens": str(FEW_TOKENS)}
    r = httpx.post(f"{live_server.base_url}/ask", data=form, files=[("image", ("p.png", PHOTO, "image/png"))],
                   timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["answer"], str) and body["degraded"] == []
    check_sources(body["sources"], live_server, 2)
    assert len(body["sources"]) == 4
    assert {"decode", "embed", "search", "rerank", "prompt", "generate", "total"} <= set(body["timings"])
    usage = body["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == usage["total_tokens"]

    r = httpx.post(f"{live_server.base_url}/ask", data={**form, "stream": "true", "scorer": "clip"},
                   files=[("image", ("p.png", PHOTO, "image/png"))], timeout=120)
    lines = [line for line in r.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["sources"]


def test_ready_and_models(live_server: LiveServer, sdk: OpenAI) -> None:
    assert [m.id for m in sdk.models.list()] == ["vlmrag"]
    r = httpx.get(f"{live_server.url}/readyz", timeout=10)
    assert r.status_code == 200 and r.json()["checks"]["vllm"] == {live_server.vllm.url: "ok"}
