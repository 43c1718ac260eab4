"""The scorer registry: a scorer class registered in ``SCORERS`` (and nothing else edited) is accepted by
the plan's models, the settings and the API, listed by GET /v1/scorers and the OpenAPI schema, offered by
``vlmrag eval --scorer`` and dispatched by ``RerankService.rerank``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import ClassVar

import pytest
from pydantic import ValidationError

from retriever.plan import RetrievalPlan
from retriever.rerank import RerankService
from retriever.scorers import SCORERS, ImageLoader, ScoreReport, YesNoJudge, clip_relevancy
from retriever.types import Candidate, SnippetPayload
from server.api_models import RetrievalOptions, SearchRequest
from server.cli import build_parser
from server.settings import Settings
from tests.support.fixtures_server import ingest_samples


class InverseScorer:
    """A made-up scorer: 1 - the clip relevancy, so the least similar candidate ranks first."""

    name: ClassVar[str] = "inverse"
    description: ClassVar[str] = "One minus the CLIP relevancy (a test scorer)."
    threshold: ClassVar[bool] = True
    uses_model: ClassVar[bool] = False

    def __init__(self, judge: YesNoJudge) -> None:
        self.judge = judge

    async def score(
        self, query_text: str, query_images: list[bytes], candidates: Sequence[Candidate], load_image: ImageLoader,
        *, image_text: str = "",
    ) -> ScoreReport:
        return ScoreReport({c.id: 1.0 - clip_relevancy(c) for c in candidates},
                           {c.id: "inverse" for c in candidates}, self.name)


@pytest.fixture
def inverse() -> Iterator[type[InverseScorer]]:
    SCORERS[InverseScorer.name] = InverseScorer
    yield InverseScorer
    del SCORERS[InverseScorer.name]


def cand(i: int, cosine: float) -> Candidate:
    return Candidate(id=f"c{i}", clip_score=cosine, rank=i, vector_scores={"text->image": cosine},
                     payload=SnippetPayload(kind="text", text=f"snippet {i}"))


def test_an_unregistered_scorer_is_refused_everywhere() -> None:
    for build in (lambda: RetrievalOptions(scorer="inverse"), lambda: SearchRequest(text="x", scorer="inverse"),
                  lambda: Settings(rerank_scorer="inverse")):
        with pytest.raises(ValidationError, match="unknown scorer 'inverse'"):
            build()


def test_a_registered_scorer_is_accepted_by_the_models_and_the_cli(inverse) -> None:
    assert RetrievalOptions(scorer="inverse").scorer == "inverse"
    assert SearchRequest(text="x", reranker="inverse").scorer == "inverse"
    assert Settings(rerank_scorer="inverse").rerank_scorer == "inverse"
    schema = RetrievalOptions.model_json_schema()["properties"]["scorer"]["anyOf"][0]
    assert schema == {"type": "string", "enum": ["vlm", "rerank", "evidence", "clip", "none", "inverse"]}
    args = build_parser("eval").parse_args(["eval", "--coco", "a.json", "--out", "o", "--scorer", "inverse"])
    assert args.scorer == "inverse"
    with pytest.raises(SystemExit):  # `none` applies no threshold: nothing for eval to sweep
        build_parser("eval").parse_args(["eval", "--coco", "a.json", "--out", "o", "--scorer", "none"])


async def test_rerank_dispatches_to_the_registered_scorer(inverse) -> None:
    cands = [cand(1, 0.9), cand(2, 0.1), cand(3, -0.5)]  # clip relevancy 0.95, 0.55, 0.25
    out = await RerankService(None, lambda c: None).rerank("q", [], cands, RetrievalPlan(k=2, threshold=0.5,
                                                                                         scorer="inverse"))
    assert out.scorer == "inverse" and out.score_paths == {"inverse": 3}
    assert [c.id for c in out.kept] == ["c3"]  # 0.75 kept; 0.45 and 0.05 under the threshold
    assert {c.id: round(c.relevancy or 0, 6) for c in cands} == {"c1": 0.05, "c2": 0.45, "c3": 0.75}


async def test_scorers_route_lists_the_registry_and_the_default(client, inverse) -> None:
    r = await client.get("/v1/scorers")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["default"] == "clip"  # the test settings' VLMRAG_RERANK_SCORER
    assert [s["name"] for s in body["scorers"]] == ["vlm", "rerank", "evidence", "clip", "none", "inverse"]
    assert {s["name"]: s["threshold"] for s in body["scorers"]} == {
        "vlm": True, "rerank": True, "evidence": True, "clip": True, "none": False, "inverse": True}
    assert all(s["description"] for s in body["scorers"])
    # rerank needs VLMRAG_RANKER_URL, unset in the test settings; the others need nothing
    assert {s["name"]: s["available"] for s in body["scorers"]} == {
        "vlm": True, "rerank": False, "evidence": True, "clip": True, "none": True, "inverse": True}
    spec = (await client.get("/openapi.json")).json()
    assert "inverse" in spec["components"]["schemas"]["SearchRequest"]["properties"]["scorer"]["anyOf"][0]["enum"]


async def test_the_api_runs_a_registered_scorer_and_refuses_an_unknown_one(client, knowledge_base, inverse) -> None:
    await ingest_samples(knowledge_base)
    r = await client.post("/v1/search", json={"text": "checkerboard", "scorer": "inverse", "threshold": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["scorer"] == "inverse"
    for c in body["candidates"]:
        assert c["relevancy"] == pytest.approx(1 - clip_relevancy(Candidate(
            id=c["id"], clip_score=c["clip_score"], vector_scores=c["vector_scores"], payload=SnippetPayload(kind="text"))))
    r = await client.post("/v1/search", json={"text": "checkerboard", "scorer": "bm25"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "scorer", r.text
    assert "unknown scorer 'bm25'" in r.json()["error"]["message"]
    r = await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "retrieval": {"scorer": "bm25"}})
    assert r.status_code == 400, r.text


async def test_scorers_route_needs_a_chat_key(make_client) -> None:
    keys = "chat:chat-key-0123456789abcdef"
    async with make_client(auth_disabled=False, api_keys=keys) as c:
        assert (await c.get("/v1/scorers")).status_code == 401
        r = await c.get("/v1/scorers", headers={"Authorization": "Bearer chat-key-0123456789abcdef"})
        assert r.status_code == 200 and r.json()["default"] == "clip"


async def test_rerank_is_available_once_a_ranker_url_is_set(make_client) -> None:
    async with make_client(ranker_url=["http://127.0.0.1:9"]) as c:  # nothing listens: availability is the setting
        body = (await c.get("/v1/scorers")).json()
        assert {s["name"]: s["available"] for s in body["scorers"]}["rerank"] is True
