"""The ``rerank`` scorer against a real CPU vLLM serving the tiny random-weight ranker (``JinaVLForRanking``,
``--runner pooling``): one /rerank request for the whole pool, images included, and the faults."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from retriever.images import data_url
from retriever.plan import RetrievalPlan
from retriever.ranker import PATH_RANKER
from retriever.rerank import RerankService
from retriever.types import Candidate, SnippetPayload
from server.ranker_client import RankerClient
from tests.support.media import png_bytes
from tests.support.settings import bare_settings
from tests.support.vllm_server import RANKER_ARGS, VLLMServer, free_port

pytestmark = pytest.mark.e2e
RANKER_NAME = "tiny-ranker"


class Counting(httpx.AsyncBaseTransport):
    """The real network under a record of every request's path."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.paths: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(request.url.path)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.fixture(scope="module")
def ranker_server(tiny_ranker_dir: Path) -> Iterator[VLLMServer]:
    """A ranker of this module's own: the last test kills it."""
    from tests.support.fixtures_vllm import vllm_python

    server = VLLMServer(tiny_ranker_dir, served_model_name=RANKER_NAME, venv_python=vllm_python(),
                        extra_args=RANKER_ARGS)
    try:
        server.start()
    except Exception as exc:  # noqa: BLE001 - the log tail is in the message
        pytest.fail(f"the tiny ranker did not start: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


def ranker_for(url: str, transport: httpx.AsyncBaseTransport | None = None) -> RankerClient:
    settings = bare_settings(ranker_url=[url], ranker_model=RANKER_NAME, ranker_timeout_s=60.0,
                             vllm_retry_attempts=1)
    return RankerClient.from_ranker_settings(settings, transport=transport)


def pool() -> tuple[list[Candidate], dict[str, bytes]]:
    """Four photos (two with OCR text) and four text snippets."""
    images = {f"blob{i}": png_bytes(Image.new("RGB", (64, 48), (60 * i, 200 - 40 * i, 90))) for i in range(4)}
    cands = [Candidate(f"img{i}", SnippetPayload(kind="image", text=f"pump photo {i}", image_ref=f"blob{i}",
                                                 ocr_text=f"ERROR E-23{i}" if i % 2 else None),
                       clip_score=0.6, vector_scores={"text->image": 0.3 - i / 100}, rank=i + 1) for i in range(4)]
    cands += [Candidate(f"txt{i}", SnippetPayload(kind="text", text=f"Maintenance note {i}: pump seals and valves."),
                        clip_score=0.4, vector_scores={"text->text": 0.6 - i / 100}, rank=5 + i) for i in range(4)]
    return cands, images


def loader(images: dict[str, bytes]) -> Callable[[Candidate], Awaitable[bytes | None]]:
    async def load(c: Candidate) -> bytes | None:
        return images.get(c.payload.image_ref or "")

    return load


async def test_one_request_scores_the_pool_with_images(ranker_server: VLLMServer) -> None:
    cands, images = pool()
    load = loader(images)

    transport = Counting()
    ranker = ranker_for(ranker_server.url, transport)
    query_photo = png_bytes(Image.new("RGB", (64, 64), (250, 10, 10)))
    try:
        assert await ranker.probe(10.0) == {ranker_server.url: "ok"}
        transport.paths.clear()
        out = await RerankService(None, load, timeout_s=60, ranker=ranker).rerank(
            "pump error E-231", [query_photo], cands, RetrievalPlan(k=3, threshold=0.0, scorer="rerank"))
    finally:
        await ranker.aclose()
    assert transport.paths == ["/rerank"]  # ONE call for eight candidates, four photos and a query photo
    assert out.scorer == "rerank" and out.degraded == [] and out.score_paths == {PATH_RANKER: 8}
    scores = [c.relevancy for c in cands]
    assert all(s is not None and 0.0 <= s <= 1.0 for s in scores)
    # vLLM's probability: sigmoid(logit - 2.65) (jina-reranker-m0's calibration); the dummy weights (uniform
    # +-1e-3) leave the last token's state to its embedding, so the random head's logit is ~0 for every pair
    assert all(s == pytest.approx(1 / (1 + math.exp(2.65)), abs=1e-3) for s in scores)
    assert len(out.kept) == 3


async def test_search_api_with_the_rerank_scorer_makes_one_ranker_call(
    ranker_server: VLLMServer, settings: Any, knowledge_base: Any,
) -> None:
    """The whole service: /v1/search over a real KB (4 photos, 2 texts), the real ranker on the wire."""
    from server.app import create_app
    from tests.support.fixtures_server import ingest_samples, running_client

    await ingest_samples(knowledge_base)
    transport = Counting()
    changed = settings.model_copy(update={"ranker_url": [ranker_server.url], "ranker_model": RANKER_NAME,
                                          "ranker_timeout_s": 60.0, "rerank_timeout_s": 60.0})
    app = create_app(changed, knowledge_base=knowledge_base, vllm_transport=transport)
    photo = png_bytes(Image.new("RGB", (64, 64), (0, 0, 250)))
    async with running_client(app) as c:
        r = await c.post("/v1/search", json={"text": "a blue gradient", "image": data_url(photo), "scorer": "rerank",
                                             "pool": 8, "threshold": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        ready = (await c.get("/readyz")).json()
    assert body["scorer"] == "rerank" and body["degraded"] == [] and len(body["candidates"]) == 6
    assert all(0.0 <= cand["relevancy"] <= 1.0 for cand in body["candidates"])
    assert transport.paths.count("/rerank") == 2  # the search's ONE call, then /readyz's one-document probe
    assert ready["checks"]["ranker"] == {ranker_server.url: "ok"}


async def test_a_wrong_ranker_url_degrades_to_evidence() -> None:
    cands, images = pool()
    ranker = ranker_for(f"http://127.0.0.1:{free_port()}")
    try:
        report = await RerankService(None, loader(images), ranker=ranker).score("pump", [], cands, scorer="rerank")
    finally:
        await ranker.aclose()
    assert report.scorer == "evidence" and report.degraded == ["rerank"]


async def test_a_killed_ranker_degrades_to_evidence_never_fails(ranker_server: VLLMServer) -> None:
    """Last in this module: the ranker is killed for good."""
    cands, images = pool()
    ranker = ranker_for(ranker_server.url)
    service = RerankService(None, loader(images), timeout_s=30, ranker=ranker)
    try:
        before = await service.score("pump", [], cands, scorer="rerank")
        ranker_server.kill()
        after = await service.score("pump", [], cands, scorer="rerank")
    finally:
        await ranker.aclose()
    assert before.scorer == "rerank" and before.degraded == []
    assert after.scorer == "evidence" and after.degraded == ["rerank"]
    assert all(0.0 <= s <= 1.0 for s in after.scores.values())
