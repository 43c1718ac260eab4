"""HNSW builds beside the running server: /v1/knowledge-bases/{name}/optimize, the auto-build, cancellation.

The build is real: a child process (``python -m retriever.store.hnsw``) on a copy of the KB's Edge shard,
then the swap; the server answers searches and takes ingestions throughout.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest

from retriever.knowledge_base import KnowledgeBase
from retriever.store import open_store
from retriever.store.edge import EdgeStore
from retriever.types import PointRecord, SnippetPayload
from server.app import create_app
from server.services.hnsw_builds import AUTO_RETRY_AFTER_S, HnswBuild, HnswBuilds, unindexed_points
from server.settings import Settings
from tests.support.fake_vllm import FakeVLLM
from tests.support.fixtures_retriever import TEST_COLLECTION
from tests.support.fixtures_server import running_client

POINTS = 400


async def _fill(store: EdgeStore, dim: int, n: int, start: int = 0) -> None:
    rng = np.random.default_rng(start)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    await store.upsert([
        PointRecord(str(uuid.UUID(int=start + i + 1)), {"image": v.tolist(), "text": v[::-1].tolist()},
                    SnippetPayload(kind="text", text=f"synthetic snippet {start + i}", source="fill.txt"))
        for i, v in enumerate(vectors)
    ])


async def _settle(client: httpx.AsyncClient, kb: str = "default", timeout_s: float = 90.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = (await client.get(f"/v1/knowledge-bases/{kb}/optimize")).json()
        if body["state"] != "running":
            return body
        await asyncio.sleep(0.2)
    raise AssertionError(f"the build of {kb} did not finish in {timeout_s} s")


def _app(settings: Settings, knowledge_base: KnowledgeBase, fake_vllm: FakeVLLM, **overrides: Any) -> Any:
    changed = settings.model_copy(update={"hnsw_min_points": 1000, "hnsw_m": 8, "hnsw_ef_construct": 32,
                                          "hnsw_build_threads": 1, **overrides})
    return create_app(changed, knowledge_base=knowledge_base, vllm_transport=httpx.MockTransport(fake_vllm))


@pytest.fixture
async def filled(knowledge_base: KnowledgeBase) -> AsyncIterator[KnowledgeBase]:
    assert isinstance(knowledge_base.store, EdgeStore)
    await knowledge_base.store.ensure_collection(knowledge_base.embedder.dim, knowledge_base.embedder.identity)
    await _fill(knowledge_base.store, knowledge_base.embedder.dim, POINTS)
    yield knowledge_base


async def test_build_beside_the_server_keeps_serving_and_keeps_writes(
    settings: Settings, filled: KnowledgeBase, fake_vllm: FakeVLLM,
) -> None:
    app = _app(settings, filled, fake_vllm)
    async with running_client(app) as client:
        r = await client.get("/v1/knowledge-bases/default/optimize")
        assert r.status_code == 200 and r.json()["state"] == "idle"
        assert r.json()["index"] == {"points": POINTS, "segments": 1, "indexed_vectors": 0}
        r = await client.post("/v1/knowledge-bases/default/optimize")
        assert r.status_code == 200 and r.json()["state"] == "not_needed"
        assert "VLMRAG_HNSW_MIN_POINTS=1000" in r.json()["reason"]
        r = await client.post("/v1/knowledge-bases/default/optimize", json={"force": True})
        assert r.status_code == 202 and r.json()["state"] == "running" and r.json()["trigger"] == "api"
        again = await client.post("/v1/knowledge-bases/default/optimize", json={"force": True})
        assert again.status_code == 409 and "already running" in again.json()["error"]["message"]
        # while the child builds: a search and an ingestion through the API
        r = await client.post("/v1/search", json={"text": "synthetic snippet", "scorer": "none", "mode": "dense"})
        assert r.status_code == 200 and r.json()["candidates"]
        r = await client.post("/v1/snippets", data={"text": "added while the graph was built", "source": "late.txt"})
        assert r.status_code == 201
        late = r.json()["id"]
        done = await _settle(client)
        assert done["state"] == "done", done
        assert done["result"]["replayed_writes"] == 1 and done["result"]["shard"].endswith("__v2")
        assert done["index"]["points"] == POINTS + 1 and done["index"]["indexed_vectors"] >= 2 * POINTS
        assert (await client.get(f"/v1/snippets/{late}")).json()["text"] == "added while the graph was built"
        r = await client.post("/v1/search", json={"text": "added while the graph was built", "scorer": "none",
                                                  "mode": "lexical"})
        assert r.json()["candidates"][0]["id"] == late
        metrics = (await client.get("/metrics")).text
        assert 'vlmrag_hnsw_builds_total{state="done"} 1.0' in metrics
    assert filled.store.shard_dir.name.endswith("__v2")  # type: ignore[attr-defined]


async def test_the_server_builds_by_itself_once_the_store_is_big_enough(
    settings: Settings, filled: KnowledgeBase, fake_vllm: FakeVLLM,
) -> None:
    app = _app(settings, filled, fake_vllm, hnsw_min_points=POINTS + 1)
    async with running_client(app) as client:
        r = await client.post("/v1/snippets", data={"text": "the snippet that crosses the line", "source": "x.txt"})
        assert r.status_code == 201
        done = await _settle(client)
        assert done["state"] == "done" and done["trigger"] == "auto", done
        # one more snippet: 1 of 402 points unindexed, far below 20 %: no new build
        await client.post("/v1/snippets", data={"text": "one more", "source": "y.txt"})
        body = (await client.get("/v1/knowledge-bases/default/optimize")).json()
        assert body["started_at"] == done["started_at"] and body["state"] == "done"


async def test_turned_off_the_server_never_builds_by_itself(
    settings: Settings, filled: KnowledgeBase, fake_vllm: FakeVLLM,
) -> None:
    app = _app(settings, filled, fake_vllm, hnsw_min_points=POINTS + 1, hnsw_auto=False)
    async with running_client(app) as client:
        await client.post("/v1/snippets", data={"text": "the snippet that crosses the line", "source": "x.txt"})
        assert (await client.get("/v1/knowledge-bases/default/optimize")).json()["state"] == "idle"


async def test_deleting_a_kb_stops_its_build(settings: Settings, knowledge_base: KnowledgeBase,
                                             fake_vllm: FakeVLLM) -> None:
    app = _app(settings, knowledge_base, fake_vllm)
    async with running_client(app) as client:
        assert (await client.post("/v1/knowledge-bases", json={"name": "pumps"})).status_code == 201
        kb = await app.state.vlmrag.knowledge_bases.get("pumps")
        await _fill(kb.store, kb.embedder.dim, POINTS)
        r = await client.post("/v1/knowledge-bases/pumps/optimize", json={"force": True})
        assert r.status_code == 202
        assert (await client.delete("/v1/knowledge-bases/pumps")).status_code == 200
        status = app.state.vlmrag.hnsw_builds.status("pumps")
        assert status.state == "failed" and "cancelled" in status.reason
        assert not [p for p in Path(kb.store.path).iterdir() if "pumps" in p.name]
        assert (await client.get("/v1/knowledge-bases/pumps/optimize")).status_code == 404


async def test_a_qdrant_server_needs_no_build(settings: Settings) -> None:
    builds = HnswBuilds(settings.model_copy(update={"hnsw_auto": True, "hnsw_min_points": 1}))
    store = await open_store(qdrant_url=":memory:", api_key="", path=settings.embedded_store_path,
                             collection=TEST_COLLECTION)
    try:
        await store.ensure_collection(4, "test-embedder")
        await store.upsert([PointRecord(str(uuid.uuid4()), {"text": [1.0, 0.0, 0.0, 0.0]}, SnippetPayload(kind="text"))])
        remote = SimpleNamespace(store=store)  # a KnowledgeBase on a Qdrant server (qdrant-client local mode)
        build = await builds.start("default", remote, force=True)  # type: ignore[arg-type]
        assert build.state == "not_needed" and build.reason == "a Qdrant server builds HNSW itself"
        assert await builds.maybe_start("default", remote) is None  # type: ignore[arg-type]
    finally:
        await store.close()


def test_unindexed_points_counts_points_outside_the_graphs() -> None:
    assert unindexed_points({"points": 100, "segments": 2, "indexed_vectors": 160}) == 20  # 80 points x 2 vectors
    assert unindexed_points({"points": 100, "segments": 1, "indexed_vectors": 0}) == 100
    assert unindexed_points({"points": 5, "segments": 1, "indexed_vectors": 20}) == 0


async def test_auto_build_waits_after_a_failure(settings: Settings, filled: KnowledgeBase) -> None:
    builds = HnswBuilds(settings.model_copy(update={"hnsw_min_points": 10}))
    builds._builds["default"] = HnswBuild("default", "failed", "auto", finished_at=time.time() - 5)
    assert await builds.maybe_start("default", filled) is None  # failed 5 s ago: not again yet
    builds._builds["default"].finished_at = time.time() - AUTO_RETRY_AFTER_S - 1
    started = await builds.maybe_start("default", filled)
    assert started is not None and started.state == "running" and started.trigger == "auto"
    await builds.close()  # cancels it: the child is killed, the copy removed
    assert builds.status("default").state == "failed"
    assert sorted(p.name for p in filled.store.path.iterdir()) == [filled.store.collection]  # type: ignore[attr-defined]
