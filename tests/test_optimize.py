"""HNSW for the embedded store: EdgeStore.optimize(HnswParams), exact search, and `vlmrag optimize`."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from retriever.errors import Conflict, StoreUnavailable
from retriever.store import open_store
from retriever.store.edge import EdgeStore, HnswParams
from retriever.store.hnsw import build_while_serving
from retriever.types import PointRecord, SearchFilters, SnippetPayload
from server.cli import COMMANDS, build_parser
from server.commands import optimize
from server.commands.optimize import optimize_store
from server.settings import Settings
from tests.support.fixtures_retriever import TEST_COLLECTION, MakeStore
from tests.support.settings import bare_settings

DIM = 32
POINTS = 1500
# Segments this small are normally scanned; a 1 KB threshold makes the tests walk the graph.
SMALL = HnswParams(m=8, ef_construct=32, full_scan_threshold_kb=1)


def _vectors(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(8, DIM))
    vectors = centres[rng.integers(0, 8, n)] + 0.5 * rng.normal(size=(n, DIM))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


async def _fill(store, vectors: np.ndarray, start: int = 0) -> None:  # type: ignore[no-untyped-def]
    await store.upsert([
        PointRecord(str(uuid.UUID(int=start + i + 1)), {"image": v.tolist(), "text": v[::-1].tolist()},
                    SnippetPayload(kind="image_text", text=f"snippet {start + i}", source=f"s{i % 3}"))
        for i, v in enumerate(vectors)
    ])


def _ids(hits) -> list[str]:  # type: ignore[no-untyped-def]
    return [hit.id for hit in hits]


def _settings(tmp_path: Path, **overrides: object) -> Settings:
    return bare_settings(data_dir=tmp_path, collection=TEST_COLLECTION, **overrides)


async def test_exact_keyword_on_both_adapters(store, embedder) -> None:  # type: ignore[no-untyped-def]
    assert embedder.dim == DIM  # the tiny CLIP's
    vectors = _vectors(200)
    await _fill(store, vectors)
    query = vectors[5].tolist()
    approximate = await store.search("image", query, 10)
    exact = await store.search("image", query, 10, exact=True)
    assert _ids(exact) == _ids(approximate) and exact[0].id == str(uuid.UUID(int=6))


async def test_optimize_builds_hnsw_and_search_agrees_with_exact(tmp_path: Path) -> None:
    store = EdgeStore(tmp_path / "qdrant", TEST_COLLECTION)
    await store.ensure_collection(DIM, "test-embedder")
    vectors = _vectors(POINTS)
    await _fill(store, vectors)
    assert (await store.index_info())["indexed_vectors"] == 0
    assert await store.optimize(SMALL)
    info = await store.index_info()
    assert info["points"] == POINTS and info["indexed_vectors"] == 2 * POINTS  # image and text
    store.hnsw_ef = 64
    queries = _vectors(20, seed=1)
    overlap = []
    for query in queries:
        approximate = set(_ids(await store.search("image", query.tolist(), 20)))
        exact = set(_ids(await store.search("image", query.tolist(), 20, exact=True)))
        overlap.append(len(approximate & exact) / 20)
    assert np.mean(overlap) >= 0.9
    # points added after the build are found (they sit in a scanned appendable segment), and fast
    started = time.perf_counter()
    await _fill(store, _vectors(10, seed=2), start=POINTS)
    assert time.perf_counter() - started < 2.0, "an upsert must not rebuild the graph"
    newest = _vectors(10, seed=2)[3]
    assert (await store.search("image", newest.tolist(), 5))[0].id == str(uuid.UUID(int=POINTS + 4))
    await store.close()
    # the HNSW config persists: a reopened store keeps the graph and the metadata
    again = await open_store(qdrant_url="", api_key="", path=tmp_path / "qdrant", collection=TEST_COLLECTION)
    assert isinstance(again, EdgeStore)
    assert (await again.index_info())["indexed_vectors"] >= 2 * POINTS
    assert await again.embedder_id() == "test-embedder" and await again.count() == POINTS + 10
    hits = await again.search("image", vectors[0].tolist(), 3)
    assert hits[0].id == str(uuid.UUID(int=1)) and hits[0].payload.text == "snippet 0"
    await again.close()


async def test_optimize_keeps_the_lexical_vector(tmp_path: Path) -> None:
    store = EdgeStore(tmp_path / "qdrant", TEST_COLLECTION)
    await store.ensure_collection(DIM, "test-embedder")
    await _fill(store, _vectors(100))
    lexical = await store.has_lexical()
    await store.optimize(SMALL)
    assert await store.has_lexical() == lexical
    await store.close()


async def test_optimize_keeps_the_passage_sections(tmp_path: Path) -> None:
    """The shard rebuilt with HNSW keeps ``passage`` a multi-vector: a point still scores by its best row."""
    from retriever.store.base import PASSAGE_VECTOR
    from retriever.types import PassageSpec

    spec = PassageSpec(DIM, "text:test", sections=True)
    store = EdgeStore(tmp_path / "qdrant", TEST_COLLECTION)
    await store.ensure_collection(DIM, "test-embedder", spec)
    vectors = _vectors(300)
    await store.upsert([
        PointRecord(str(uuid.UUID(int=i + 1)), {"text": v.tolist(), PASSAGE_VECTOR: [vectors[(i + 7) % 300].tolist(), v.tolist()]},
                    SnippetPayload(kind="text", text=f"snippet {i}"))
        for i, v in enumerate(vectors)
    ])
    await store.optimize(SMALL)
    assert await store.passage_spec() == spec
    hits = await store.search(PASSAGE_VECTOR, vectors[42].tolist(), 2, exact=True)
    # vectors[42] is point 43's second row and point 36's first: both score ~1 by their best row
    assert {h.id for h in hits} == {str(uuid.UUID(int=43)), str(uuid.UUID(int=36))}
    assert min(h.score for h in hits) > 0.99
    await store.close()


async def test_command_builds_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = _settings(tmp_path, hnsw_min_points=POINTS, hnsw_m=8, hnsw_ef_construct=32)
    store = EdgeStore(settings.embedded_store_path, TEST_COLLECTION)
    await store.ensure_collection(DIM, "test-embedder")
    await _fill(store, _vectors(POINTS - 1))
    await store.close()
    skipped = await optimize_store(settings)
    assert not skipped["built"] and "VLMRAG_HNSW_MIN_POINTS" in skipped["reason"]
    built = await optimize_store(settings, force=True)
    assert built["built"] and built["points"] == POINTS - 1 and built["m"] == 8
    assert built["indexed_vectors"] == 2 * (POINTS - 1) and built["seconds"] >= 0


def test_command_output_and_registration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert COMMANDS["optimize"][0] == "server.commands.optimize"
    args = build_parser("optimize").parse_args(["optimize", "--json", "--force"])
    assert args.func is optimize.run and args.force
    remote = _settings(tmp_path, qdrant_url="http://qdrant.test:6333")
    assert optimize.run(argparse.Namespace(force=False, json=True), remote) == 0
    assert json.loads(capsys.readouterr().out)["reason"] == "a Qdrant server builds HNSW itself"


async def test_command_refuses_a_store_held_by_a_server(
    tmp_path: Path, make_store: MakeStore, embedder,  # type: ignore[no-untyped-def]
) -> None:
    settings = _settings(tmp_path)
    held = await make_store("edge", path=settings.embedded_store_path)  # the "server" holding the lock
    await _fill(held, _vectors(5)[:, :embedder.dim])
    with pytest.raises(StoreUnavailable, match="optimize through the vlmrag server"):
        await optimize_store(settings, force=True)


# --- building beside a serving process (retriever/store/hnsw.py) ----------------------------------
async def _served(tmp_path: Path, points: int) -> EdgeStore:
    """The store a server would hold: ``points`` clustered points under ``tmp_path/qdrant``."""
    store = EdgeStore(tmp_path / "qdrant", TEST_COLLECTION)
    await store.ensure_collection(DIM, "test-embedder")
    await _fill(store, _vectors(points))
    return store


async def _wait_for_snapshot(store: EdgeStore, task: asyncio.Task) -> None:  # type: ignore[type-arg]
    for _ in range(500):
        if store._journal is not None or task.done():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the build never took its snapshot")


async def test_build_while_serving_swaps_in_the_graph_and_keeps_concurrent_writes(tmp_path: Path) -> None:
    path = tmp_path / "qdrant"
    store = EdgeStore(path, TEST_COLLECTION)
    await store.ensure_collection(DIM, "test-embedder")
    vectors = _vectors(POINTS)
    await _fill(store, vectors)
    task = asyncio.create_task(build_while_serving(store, SMALL))
    await _wait_for_snapshot(store, task)
    assert not task.done(), "the child cannot have finished: it has not even imported yet"
    # the old shard keeps serving reads and writes while the child builds
    assert (await store.search("image", vectors[7].tolist(), 1))[0].id == str(uuid.UUID(int=8))
    added = _vectors(10, seed=2)
    await _fill(store, added, start=POINTS)
    assert await store.delete([str(uuid.UUID(int=i)) for i in (1, 2, 3)]) == 3
    assert await store.delete_by_filter(SearchFilters(source="s2")) > 0  # every third snippet
    result = await task
    assert result.replayed_writes == 3 and result.shard == f"{TEST_COLLECTION}__v2"
    assert result.build_seconds > 0 and result.seconds >= result.build_seconds
    expected = await store.count()
    assert result.points == expected and result.indexed_vectors > 0
    # the writes made during the build are in the new shard, the deleted points are not
    assert (await store.search("image", added[3].tolist(), 1))[0].id == str(uuid.UUID(int=POINTS + 4))
    assert await store.retrieve([str(uuid.UUID(int=1)), str(uuid.UUID(int=6))]) == []  # id 1 deleted, id 6 (i=5) is s2
    assert await store.count(SearchFilters(source="s2")) == 0
    await store.close()  # waits for the old shard's retirement
    assert sorted(p.name for p in path.iterdir()) == [f"{TEST_COLLECTION}__current", f"{TEST_COLLECTION}__v2"]
    again = EdgeStore(path, TEST_COLLECTION)  # a restart opens what the pointer names
    await again.open()
    assert again.shard_dir.name == f"{TEST_COLLECTION}__v2" and await again.count() == expected
    assert (await again.index_info())["indexed_vectors"] >= 2 * (POINTS - 3) * 2 // 3
    assert await again.embedder_id() == "test-embedder"
    await again.close()


async def test_a_failed_build_leaves_the_served_shard_alone(tmp_path: Path) -> None:
    store = await _served(tmp_path, 50)
    path = store.path
    with pytest.raises(StoreUnavailable, match="HNSW build of .* failed"):
        await build_while_serving(store, SMALL, python="/bin/false")
    assert store._journal is None and sorted(p.name for p in path.iterdir()) == [TEST_COLLECTION]
    await _fill(store, _vectors(5, seed=3), start=50)
    assert await store.count() == 55
    await store.close()


async def test_a_cancelled_build_kills_the_child_and_removes_the_copy(tmp_path: Path) -> None:
    store = await _served(tmp_path, 50)
    path = store.path
    sleeper = tmp_path / "slow-python"
    sleeper.write_text(f"#!/bin/sh\necho $$ > {tmp_path / 'child.pid'}\nexec sleep 60\n")
    sleeper.chmod(0o755)
    task = asyncio.create_task(build_while_serving(store, SMALL, python=str(sleeper)))
    for _ in range(500):
        if (tmp_path / "child.pid").is_file() and (tmp_path / "child.pid").read_text().strip():
            break
        await asyncio.sleep(0.01)
    pid = int((tmp_path / "child.pid").read_text())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert store._journal is None and sorted(p.name for p in path.iterdir()) == [TEST_COLLECTION]
    assert await store.count() == 50
    await store.close()


async def test_a_build_gives_up_when_too_much_is_written_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from retriever.store import edge

    monkeypatch.setattr(edge, "JOURNAL_MAX_POINTS", 5)  # the journal keeps the points: it is bounded
    store = await _served(tmp_path, 100)
    path = store.path
    task = asyncio.create_task(build_while_serving(store, SMALL))
    await _wait_for_snapshot(store, task)
    await _fill(store, _vectors(6, seed=4), start=100)  # one write of 6 points: over the bound
    with pytest.raises(Conflict, match="more than 5 points were written"):
        await task
    assert sorted(p.name for p in path.iterdir()) == [TEST_COLLECTION] and await store.count() == 106
    await store.close()


def test_the_search_beam_grows_with_the_graph() -> None:
    from retriever.store.hnsw import auto_hnsw_ef

    assert auto_hnsw_ef(0) == auto_hnsw_ef(100_000) == 256  # recall@20 0.997 at 100k
    assert 1000 <= auto_hnsw_ef(1_000_000) <= 1024  # 1024 measured 0.995 at 1M, 256 only 0.946
    assert auto_hnsw_ef(100_000_000) == 2048
    sizes = [100_000, 200_000, 500_000, 1_000_000, 5_000_000]
    assert [auto_hnsw_ef(n) for n in sizes] == sorted(auto_hnsw_ef(n) for n in sizes)
