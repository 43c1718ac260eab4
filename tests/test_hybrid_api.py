"""Hybrid retrieval through /v1/search: the three modes, identifiers, query-time OCR of a display photo.

CLIP has random weights here, so the dense lists are noise; BM25 and the OCR model are real, so an exact
identifier or the code on a photographed display must find its snippet.
"""

from __future__ import annotations

import io

import httpx
from PIL import Image, ImageDraw

from server.app import create_app
from server.settings import Settings
from tests.support.fake_vllm import FakeVLLM
from tests.support.fixtures_server import running_client
from tests.support.media import data_url
from tests.test_ocr import font

NOTES = {
    "e417": "Error E-417: the pump overheated. Let it cool for ten minutes, then check the fan.",
    "e418": "Error E-418: low water pressure. Open the inlet valve fully.",
    "p100": "Part P-100-B is the impeller seal kit for the P-100 pump.",
    "fw": "Firmware v2.3.1 fixes the display flicker of the control panel.",
}


def display_photo(text: str) -> bytes:
    image = Image.new("RGB", (640, 240), (20, 24, 28))
    ImageDraw.Draw(image).text((40, 80), text, font=font(64), fill=(120, 255, 140))
    buf = io.BytesIO()
    image.rotate(4, expand=False, fillcolor=(20, 24, 28)).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


async def _client_with_notes(settings: Settings, knowledge_base, fake_vllm: FakeVLLM, **overrides):  # type: ignore[no-untyped-def]
    ids = {}
    for key, text in NOTES.items():
        ids[key], _ = await knowledge_base.add_snippet(None, text, f"{key}.md")
    app = create_app(settings.model_copy(update=overrides), knowledge_base=knowledge_base,
                     vllm_transport=httpx.MockTransport(fake_vllm))
    return ids, running_client(app)


async def test_identifier_queries_find_their_snippet_first_in_hybrid_and_lexical(
    settings: Settings, knowledge_base, fake_vllm: FakeVLLM,
) -> None:
    ids, client_cm = await _client_with_notes(settings, knowledge_base, fake_vllm)
    async with client_cm as client:
        for query, key in [("my screen says E-417", "e417"), ("do you sell P-100-B?", "p100"),
                           ("what changed in v2.3.1", "fw"), ("e417", "e417")]:
            for mode in ("hybrid", "lexical"):
                r = await client.post("/v1/search", json={"text": query, "mode": mode, "scorer": "none", "k": 1})
                assert r.status_code == 200, r.text
                first = r.json()["candidates"][0]
                assert first["id"] == ids[key], (query, mode, first["text"])
                assert "text->lexical" in first["vector_scores"]
        r = await client.post("/v1/search", json={"text": "my screen says E-417", "mode": "dense", "scorer": "none"})
        assert all(not k.endswith("->lexical") for c in r.json()["candidates"] for k in c["vector_scores"])


async def test_a_display_photo_is_read_and_found(settings: Settings, knowledge_base, fake_vllm: FakeVLLM) -> None:
    ids, client_cm = await _client_with_notes(settings, knowledge_base, fake_vllm, ocr_query_enabled=True)
    async with client_cm as client:
        photo = data_url(display_photo("ERROR E-418"), "image/jpeg")
        r = await client.post("/v1/search", json={"image": photo, "mode": "hybrid", "scorer": "none", "k": 1})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["candidates"][0]["id"] == ids["e418"]
        assert "image->lexical" in body["candidates"][0]["vector_scores"]
        assert body["timings"]["ocr"] > 0 and body["degraded"] == []


async def test_ocr_failure_degrades_never_fails(settings: Settings, knowledge_base, fake_vllm: FakeVLLM) -> None:
    _, client_cm = await _client_with_notes(settings, knowledge_base, fake_vllm, ocr_query_enabled=True)
    async with client_cm as client:
        sliver = Image.new("RGB", (4000, 20), (255, 255, 255))  # an aspect ratio OCR refuses
        buf = io.BytesIO()
        sliver.save(buf, format="PNG")
        r = await client.post("/v1/search", json={"image": data_url(buf.getvalue()), "scorer": "none"})
        assert r.status_code == 200, r.text
        assert "ocr" in r.json()["degraded"] and r.json()["candidates"]


async def test_a_collection_without_lexical_still_serves(settings: Settings, knowledge_base, fake_vllm: FakeVLLM) -> None:
    """Points written without a lexical vector (an old collection's) are still found by CLIP."""
    from retriever.types import PointRecord, SnippetPayload

    vector = knowledge_base.embedder.embed_texts(["old"])[0].tolist()
    await knowledge_base.store.upsert([PointRecord("00000000-0000-0000-0000-0000000000aa",
                                                   {"text": vector}, SnippetPayload(kind="text", text="old E-999"))])
    app = create_app(settings, knowledge_base=knowledge_base, vllm_transport=httpx.MockTransport(fake_vllm))
    async with running_client(app) as client:
        r = await client.post("/v1/search", json={"text": "old E-999", "scorer": "none"})
        assert r.status_code == 200 and r.json()["candidates"][0]["text"] == "old E-999"


async def test_exact_reaches_the_store(settings: Settings, knowledge_base, fake_vllm: FakeVLLM,
                                       monkeypatch) -> None:
    """retrieval.exact (the HNSW escape hatch) is one request field that arrives where the store searches."""
    seen: list[bool] = []
    original = knowledge_base.store.search

    async def spy(*args, exact: bool = False, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(exact)
        return await original(*args, exact=exact, **kwargs)

    monkeypatch.setattr(knowledge_base.store, "search", spy)
    _, client_cm = await _client_with_notes(settings, knowledge_base, fake_vllm)
    async with client_cm as client:
        for body, expected in (({"text": "pump", "exact": True}, True), ({"text": "pump"}, False)):
            seen.clear()
            assert (await client.post("/v1/search", json={**body, "mode": "dense"})).status_code == 200
            assert seen and set(seen) == {expected}
        seen.clear()
        r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "pump"}],
                                                             "retrieval": {"exact": True, "mode": "dense"}})
        assert r.status_code == 200 and set(seen) == {True}
