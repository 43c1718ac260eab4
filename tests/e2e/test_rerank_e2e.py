"""The vlm re-ranker and the COCO harness against the real tiny vLLM (CPU, random weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from retriever.eval.coco import CocoEval, EvalConfig, kb_image_loader
from retriever.eval.metrics import FAMILY_RERANK
from retriever.plan import RetrievalPlan
from retriever.rerank import PATH_BOUND, PATH_PROMPT, PATH_TOP, RerankService, image_data_url
from retriever.types import Candidate, SnippetPayload
from server.vllm_client import VLLMClient
from tests.support.media import png_bytes
from tests.support.vllm_server import free_port
from tests.test_eval import write_coco

pytestmark = pytest.mark.e2e
VLM_PATHS = {PATH_TOP, PATH_BOUND, PATH_PROMPT}


def png(colour: tuple[int, int, int]) -> bytes:
    return png_bytes(Image.new("RGB", (64, 48), colour))


class Recorder:
    """Wraps the real VLLMClient: records bodies and the number of requests in flight."""

    def __init__(self, client: VLLMClient) -> None:
        self.client = client
        self.bodies: list[dict[str, Any]] = []
        self.in_flight = self.max_in_flight = 0

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        self.bodies.append(body)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self.client.complete(body)
        finally:
            self.in_flight -= 1

    async def tokenize(self, text: str) -> list[int]:
        return await self.client.tokenize(text)


def candidates() -> tuple[list[Candidate], dict[str, bytes]]:
    images = {f"blob{i}": png((60 * i, 120, 200 - 50 * i)) for i in range(3)}
    cands = [
        Candidate(f"img{i}", SnippetPayload(kind="image", text="", image_ref=f"blob{i}"), clip_score=0.9 - i / 10,
                  vector_scores={"text->image": 0.3 - i / 100}, rank=i + 1)
        for i in range(3)
    ] + [
        Candidate(f"txt{i}", SnippetPayload(kind="text", text=f"A note about bicycles, part {i}."),
                  clip_score=0.5 - i / 10, vector_scores={"text->text": 0.8 - i / 100}, rank=4 + i)
        for i in range(3)
    ]
    return cands, images


@pytest.fixture
def client(vllm_server: Any) -> VLLMClient:
    """A client for the session's server; made per test, its connections opened in the test's loop."""
    return VLLMClient([vllm_server.url], vllm_server.served_model_name, deadline_s=60)


@pytest.mark.parametrize("top_logprobs", [20, 1])
async def test_vlm_scores_every_candidate_on_the_real_server(client: VLLMClient, top_logprobs: int) -> None:
    """top_logprobs=1 leaves yes/no out of the list almost surely: the prompt_logprobs replay runs."""
    cands, images = candidates()
    backend = Recorder(client)

    async def load(c: Candidate) -> bytes | None:
        return images.get(c.payload.image_ref or "")

    service = RerankService(backend, load, concurrency=3, top_logprobs=top_logprobs)
    query_image = png((250, 10, 10))
    try:
        out = await service.rerank("a red bicycle", [query_image], cands, RetrievalPlan(k=2, threshold=0.0))
    finally:
        await client.aclose()
    assert out.scorer == "vlm" and out.degraded == []
    assert set(out.paths) == {c.id for c in cands} and set(out.paths.values()) <= VLM_PATHS
    assert all(c.relevancy is not None and 0.0 <= c.relevancy <= 1.0 for c in cands)
    assert len(out.kept) == 2 and all(c.reason in ("over_k", "below_threshold") for c in out.dropped)
    assert 1 < backend.max_in_flight <= 3
    if top_logprobs == 1:
        assert out.score_paths.get(PATH_PROMPT, 0) >= 1
        assert any(b.get("continue_final_message") for b in backend.bodies)
    firsts = [b for b in backend.bodies if b.get("logprobs")]
    assert len(firsts) == len(cands)
    for body in firsts:
        urls = [p["image_url"]["url"] for p in body["messages"][0]["content"] if p["type"] == "image_url"]
        assert urls[0] == image_data_url(query_image)
        if "kind=\"image\"" in "".join(p.get("text", "") for p in body["messages"][0]["content"]):
            assert len(urls) == 2 and urls[1].startswith("data:image/png;base64,")
        else:
            assert len(urls) == 1


async def test_dead_vllm_degrades_to_clip() -> None:
    dead = VLLMClient([f"http://127.0.0.1:{free_port()}"], "tiny-vlm", retry_attempts=1, deadline_s=5)
    try:
        cands, images = candidates()

        async def load(c: Candidate) -> bytes | None:
            return images.get(c.payload.image_ref or "")

        out = await RerankService(dead, load, timeout_s=10).rerank("q", [], cands, RetrievalPlan(k=2, threshold=0.5))
    finally:
        await dead.aclose()
    assert out.scorer == "clip" and out.degraded == ["rerank"]
    assert [c.id for c in out.kept] == ["txt0", "txt1"]  # best cosines: text->text 0.8, 0.79
    assert all(0.0 <= c.relevancy <= 1.0 for c in cands)


async def test_harness_end_to_end_with_the_vlm_scorer(tmp_path: Path, embedder: Any, client: VLLMClient) -> None:
    from server.wiring import build_knowledge_base
    from tests.support.settings import bare_settings

    kb = await build_knowledge_base(bare_settings(data_dir=tmp_path / "kb", collection="eval"), embedder=embedder)
    try:
        coco = write_coco(tmp_path / "coco", n=5, captions=1)
        config = EvalConfig(coco, pool=5, k=3, scorer="vlm", thresholds=(0.25, 0.5, 0.75), rerank_model="tiny-vlm")
        service = RerankService(client, kb_image_loader(kb), concurrency=4)
        outcome = await CocoEval(kb, service, config, tmp_path / "out", progress=False).run()
    finally:
        await kb.close()
        await client.aclose()
    assert outcome.summary["degraded_queries"] == 0 and outcome.summary["dataset"]["queries"] == 5
    assert sum(outcome.summary["score_paths"].values()) == 25
    assert set(outcome.summary["score_paths"]) <= VLM_PATHS
    reranked = [r for r in outcome.results if r.family == FAMILY_RERANK]
    assert [r.threshold for r in reranked] == [0.25, 0.5, 0.75]
    assert all(r.latency_p50_ms > 0 for r in reranked)
    assert (tmp_path / "out" / "pr_curve.png").exists() and (tmp_path / "out" / "results.md").exists()


async def test_model_answer_check_scores_each_claim_with_images_on_the_real_server(client: VLLMClient) -> None:
    """retrieval.verify=model's plumbing: one P(yes) request per claim, the cited snippet's image attached."""
    from server.services.verification import Verifier
    from tests.support.settings import bare_settings

    cands, images = candidates()
    backend = Recorder(client)

    async def load(c: Candidate) -> bytes | None:
        return images.get(c.payload.image_ref or "")

    verifier = Verifier(bare_settings(verify_timeout_s=60.0, vllm_max_images_per_prompt=4),
                        reranker=RerankService(backend, load, concurrency=3))
    answer = "The first photo shows a bicycle [1]. Part 2 of the note covers it [5]. Replace QX-7713 [5]."
    try:
        outcome = await verifier.check(answer, cands, "model", load_image=load)
    finally:
        await client.aclose()
    claims = outcome.verification.claims
    assert outcome.degraded == [] and outcome.model_calls == 3
    assert all(c.score is not None and 0.0 <= c.score <= 1.0 for c in claims)
    assert claims[2].supported is False and claims[2].unsupported == ["QX-7713"]  # lexical, whatever the model says
    assert set(outcome.model_paths) <= VLM_PATHS and sum(outcome.model_paths.values()) == 3
    judged = [b for b in backend.bodies if b.get("logprobs")]
    first = next(b for b in judged if "shows a bicycle" in str(b["messages"]))
    urls = [p["image_url"]["url"] for p in first["messages"][0]["content"] if p["type"] == "image_url"]
    assert urls == [image_data_url(images["blob0"])]  # [1] is an image snippet: its image goes along
