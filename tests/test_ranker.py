"""The ``rerank`` scorer over a scripted ranker (httpx MockTransport): one /rerank request for the pool,
per-candidate fallback to the evidence relevancy, whole-request degradation, generative-model detection."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from retriever.evidence import evidence_relevancy
from retriever.plan import RetrievalPlan
from retriever.ranker import PATH_EVIDENCE_FALLBACK, PATH_RANKER, rank_document, rank_query, valid_scores
from retriever.rerank import RerankService, image_data_url
from retriever.types import Candidate, SnippetPayload
from server.ranker_client import RankerClient
from tests.support.settings import bare_settings

URL = "http://ranker.test:8000"
PNG = b"\x89PNG\r\n\x1a\n" + b"fake-png-body"
QUERY_PNG = b"\x89PNG\r\n\x1a\n" + b"query-photo"
Handler = Callable[[httpx.Request], httpx.Response]


def pool() -> list[Candidate]:
    """Three image snippets (one with OCR text) and three text snippets; one names the code E-238."""
    cands = [Candidate(f"img{i}", SnippetPayload(kind="image", text=f"photo {i}", image_ref=f"blob{i}",
                                                 ocr_text="ERROR E-238" if i == 0 else None),
                       clip_score=0.5, vector_scores={"text->image": 0.3 - i / 100}, rank=i + 1) for i in range(3)]
    cands += [Candidate(f"txt{i}", SnippetPayload(kind="text", text=f"note {i} about the pump"), clip_score=0.4,
                        vector_scores={"text->text": 0.6 - i / 100}, rank=4 + i) for i in range(3)]
    return cands


async def load(c: Candidate) -> bytes | None:
    return PNG if c.payload.image_ref else None


class Ranker:
    """A scripted ranker: ``score(i, document)`` per document (None: left out); records every request."""

    def __init__(self, score: Callable[[int, Any], Any] = lambda i, d: 0.1 + i / 10, *, status: int = 200) -> None:
        self.score = score
        self.status = status
        self.requests: list[httpx.Request] = []

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.requests if r.url.path == "/rerank"]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "ranker"}]})
        if self.status != 200:
            return httpx.Response(self.status, json={"error": {"message": "scripted failure"}})
        body = json.loads(request.content)
        results = [{"index": i, "relevance_score": s, "document": {"text": None}}
                   for i, d in enumerate(body["documents"]) if (s := self.score(i, d)) is not None]
        results.sort(key=lambda r: -r["relevance_score"] if isinstance(r["relevance_score"], float) else 0)
        return httpx.Response(200, content=json.dumps({"id": "x", "model": body["model"], "results": results}),
                              headers={"content-type": "application/json"})


def client(handler: Handler, **kwargs: Any) -> RankerClient:
    settings = bare_settings(ranker_url=[URL], ranker_model="ranker", vllm_retry_attempts=2)
    return RankerClient.from_ranker_settings(settings, transport=httpx.MockTransport(handler), **kwargs)


async def score(ranker: RankerClient | None, cands: list[Candidate], *, timeout_s: float = 5.0,
                query_images: list[bytes] | None = None) -> Any:
    service = RerankService(None, load, timeout_s=timeout_s, ranker=ranker)
    try:
        return await service.score("pump error E-238", query_images or [], cands, scorer="rerank")
    finally:
        if ranker is not None:
            await ranker.aclose()


async def test_one_request_scores_the_whole_pool_with_images_and_ocr_text() -> None:
    scripted = Ranker()
    cands = pool()
    report = await score(client(scripted), cands, query_images=[QUERY_PNG])
    (body,) = scripted.bodies()  # ONE request for six candidates
    assert body["model"] == "ranker" and len(body["documents"]) == 6
    assert body["query"] == {"content": [{"type": "image_url", "image_url": {"url": image_data_url(QUERY_PNG)}},
                                         {"type": "text", "text": "pump error E-238"}]}
    first = body["documents"][0]["content"]
    assert first[0] == {"type": "image_url", "image_url": {"url": image_data_url(PNG)}}
    assert first[1] == {"type": "text", "text": "photo 0\nERROR E-238"}
    assert body["documents"][3] == "note 0 about the pump"  # a text snippet goes as plain text
    assert report.scorer == "rerank" and report.degraded == []
    assert report.scores == {c.id: pytest.approx(0.1 + i / 10) for i, c in enumerate(cands)}
    assert set(report.paths.values()) == {PATH_RANKER}


async def test_the_query_without_images_is_plain_text() -> None:
    scripted = Ranker()
    await score(client(scripted), pool())
    assert scripted.bodies()[0]["query"] == "pump error E-238"


@pytest.mark.parametrize("bad", [None, math.nan, math.inf, 3.7, -0.2, "0.5"], ids=repr)
async def test_a_missing_or_invalid_score_falls_back_to_evidence_for_that_candidate(bad: object) -> None:
    cands = pool()
    evidence = evidence_relevancy("pump error E-238", "", cands)
    report = await score(client(Ranker(lambda i, d: bad if i in (1, 4) else 0.5)), cands)
    assert report.scorer == "rerank" and report.degraded == ["rerank_partial"]
    for i, c in enumerate(cands):
        if i in (1, 4):
            assert report.paths[c.id] == PATH_EVIDENCE_FALLBACK and report.scores[c.id] == evidence[c.id]
        else:
            assert report.paths[c.id] == PATH_RANKER and report.scores[c.id] == 0.5


async def test_fewer_results_than_documents() -> None:
    cands = pool()
    report = await score(client(Ranker(lambda i, d: 0.9 if i < 2 else None)), cands)
    assert [report.paths[c.id] for c in cands] == [PATH_RANKER] * 2 + [PATH_EVIDENCE_FALLBACK] * 4
    assert report.degraded == ["rerank_partial"]


@pytest.mark.parametrize("status", [500, 503, 404, 400])
async def test_an_http_error_degrades_to_the_evidence_scorer(status: int, caplog: pytest.LogCaptureFixture) -> None:
    scripted = Ranker(status=status)
    cands = pool()
    report = await score(client(scripted), cands)
    assert report.scorer == "evidence" and report.degraded == ["rerank"]
    assert report.scores == evidence_relevancy("pump error E-238", "", cands)
    assert len(scripted.bodies()) == (2 if status >= 500 else 1)  # transient ones retried (2 attempts)
    if status == 404:  # what a generative vLLM answers: the log names the setting
        assert "VLMRAG_RANKER_URL" in caplog.text and "--runner pooling" in caplog.text


async def test_an_empty_pool_asks_nothing() -> None:
    scripted = Ranker()
    report = await score(client(scripted), [])
    assert scripted.requests == [] and report.scores == {} and report.degraded == []


async def test_a_timeout_degrades_to_the_evidence_scorer() -> None:
    def timing_out(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("scripted", request=request)

    report = await score(client(timing_out), pool())
    assert report.scorer == "evidence" and report.degraded == ["rerank"]


async def test_a_ranker_slower_than_the_rerank_timeout_degrades() -> None:
    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return Ranker()(request)

    started = asyncio.get_running_loop().time()
    report = await score(client(slow), pool(), timeout_s=0.2)
    assert report.degraded == ["rerank"] and asyncio.get_running_loop().time() - started < 2


async def test_no_ranker_configured_is_the_evidence_scorer_degraded() -> None:
    cands = pool()
    report = await score(None, cands)
    assert report.scorer == "evidence" and report.degraded == ["rerank"]
    assert report.scores == evidence_relevancy("pump error E-238", "", cands)


async def test_a_candidate_whose_image_cannot_be_loaded_is_not_sent() -> None:
    scripted = Ranker(lambda i, d: 0.8)
    cands = pool()

    async def broken(c: Candidate) -> bytes | None:
        return None if c.id == "img1" else await load(c)

    ranker = client(scripted)
    try:
        report = await RerankService(None, broken, ranker=ranker).score("q", [], cands, scorer="rerank")
    finally:
        await ranker.aclose()
    assert len(scripted.bodies()[0]["documents"]) == 5
    assert report.paths["img1"] == PATH_EVIDENCE_FALLBACK and report.degraded == ["rerank_partial"]
    assert all(report.scores[c.id] == 0.8 for c in cands if c.id != "img1")


async def test_rerank_selects_by_the_ranker_probability() -> None:
    cands = pool()
    ranker = client(Ranker(lambda i, d: 0.95 if i == 4 else 0.05))
    try:
        out = await RerankService(None, load, ranker=ranker).rerank("q", [], cands, RetrievalPlan(
            k=3, threshold=0.5, scorer="rerank"))
    finally:
        await ranker.aclose()
    assert [c.id for c in out.kept] == ["txt1"] and out.scorer == "rerank" and out.score_paths == {PATH_RANKER: 6}


def test_valid_scores_refuses_duplicates_and_foreign_indices() -> None:
    results = [{"index": 0, "relevance_score": 0.2}, {"index": 0, "relevance_score": 0.9},
               {"index": 5, "relevance_score": 0.5}, {"index": True, "relevance_score": 0.5},
               {"relevance_score": 0.5}, "junk", {"index": 1, "relevance_score": 1.0000001}]
    assert valid_scores(results, 2) == {0: 0.2, 1: 1.0}
    with pytest.raises(TypeError):
        valid_scores({"index": 0}, 1)


def test_documents_and_query_shapes() -> None:
    text_only = Candidate("t", SnippetPayload(kind="text", text="  hello  ", ocr_text="world"), clip_score=0.0)
    assert rank_document(text_only, None) == "hello\nworld"
    assert rank_document(Candidate("i", SnippetPayload(kind="image"), clip_score=0.0), "data:x") == {
        "content": [{"type": "image_url", "image_url": {"url": "data:x"}}]}
    assert rank_query("", ["data:q"]) == {"content": [{"type": "image_url", "image_url": {"url": "data:q"}}]}


# --- the client's probe: a generative vLLM at the ranker URL is named in one line -------------------
async def test_probe_names_the_setting_when_the_url_serves_a_generative_model() -> None:
    def generative(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "ranker"}]})
        return httpx.Response(404, json={"detail": "Not Found"})  # vLLM's generate runner has no /rerank

    ranker = client(generative)
    try:
        (reason,) = (await ranker.probe()).values()
    finally:
        await ranker.aclose()
    assert "VLMRAG_RANKER_URL" in reason and "--runner pooling" in reason and "404" in reason


async def test_probe_of_a_pooling_ranker_is_ok() -> None:
    scripted = Ranker()
    ranker = client(scripted)
    try:
        assert await ranker.probe() == {URL: "ok"}
    finally:
        await ranker.aclose()
    assert scripted.bodies() == [{"model": "ranker", "query": "ping", "documents": ["ping"]}]


async def test_probe_reports_a_model_it_does_not_serve() -> None:
    def other(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"data": [{"id": "someone-else"}]})

    ranker = client(other)
    try:
        (reason,) = (await ranker.probe()).values()
    finally:
        await ranker.aclose()
    assert "'ranker' not served" in reason


# --- through the API: /v1/search with scorer=rerank, /readyz's ranker check ---------------------------
def routed(fake_vllm: Any, ranker: Handler) -> httpx.MockTransport:
    """The app's one transport: the ranker's host to ``ranker``, everything else to the fake vLLM."""

    async def route(request: httpx.Request) -> httpx.Response:
        if request.url.host == "ranker.test":
            return ranker(request)
        return await fake_vllm(request)

    return httpx.MockTransport(route)


async def test_search_with_the_rerank_scorer_and_readyz(settings: Any, knowledge_base: Any, fake_vllm: Any) -> None:
    from server.app import create_app
    from tests.support.fixtures_server import ingest_samples, running_client

    await ingest_samples(knowledge_base)
    scripted = Ranker(lambda i, d: 0.9 if "warranty" in str(d) else 0.1)
    changed = settings.model_copy(update={"ranker_url": [URL], "ranker_model": "ranker"})
    app = create_app(changed, knowledge_base=knowledge_base, vllm_transport=routed(fake_vllm, scripted))
    async with running_client(app) as c:
        r = await c.post("/v1/search", json={"text": "how long is the warranty", "scorer": "rerank",
                                             "threshold": 0.5})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["scorer"] == "rerank" and not body.get("degraded")
        assert len(scripted.bodies()) == 1 and len(scripted.bodies()[0]["documents"]) == len(body["candidates"])
        kept = [cand for cand in body["candidates"] if cand["kept"]]
        assert len(kept) == 1 and "warranty" in kept[0]["text"] and kept[0]["relevancy"] == pytest.approx(0.9)
        ready = (await c.get("/readyz")).json()
        assert ready["status"] == "ok" and ready["checks"]["ranker"] == {URL: "ok"}
        scripted.status = 404  # now a generative model answers at the ranker URL
        ready = (await c.get("/readyz")).json()
        assert ready["status"] == "ok"  # informational: the scorer degrades, chats go on
        assert "VLMRAG_RANKER_URL" in ready["checks"]["ranker"][URL]
        r = await c.post("/v1/search", json={"text": "warranty", "scorer": "rerank"})
        assert r.status_code == 200 and r.json()["scorer"] == "evidence" and r.json()["degraded"] == ["rerank"]
