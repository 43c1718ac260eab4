"""One VectorStore suite run against both adapters (Qdrant Edge and qdrant-client local mode)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest

from retriever.errors import Conflict, InvalidInput, NotFound, StoreUnavailable
from retriever.lexical import document_vector, query_vector
from retriever.store import open_store
from retriever.store.base import VectorStore
from retriever.types import PointRecord, SearchFilters, SnippetPayload, SparseVector
from tests.support.fixtures_retriever import STORE_KINDS, TEST_COLLECTION
from tests.support.tiny_clip import TINY_CLIP_DIM

DIM = TINY_CLIP_DIM
SOURCES = ("manual.pdf", "photos/", "notes.md")
KINDS = ("image", "text", "image_text")
#: Edge stores vectors as float16 (retriever.store.edge.VECTOR_DATATYPE): rounding stored and query
#: unit vectors (relative error <= 2**-11 each) moves a cosine score by at most ~1e-3.
SCORE_ATOL = 1e-3


def pid(n: int) -> str:
    return str(uuid.UUID(int=n + 1))


def make_points(count: int, seed: int = 0) -> tuple[list[PointRecord], dict[str, dict[str, np.ndarray]]]:
    """Points with random unit vectors; kind decides which vectors a point carries."""
    rng = np.random.default_rng(seed)
    points, vectors = [], {}
    for n in range(count):
        kind = KINDS[n % 3]
        names = {"image": ["image"], "text": ["text"], "image_text": ["image", "text"]}[kind]
        vecs = {}
        for name in names:
            v = rng.normal(size=DIM).astype(np.float32)
            vecs[name] = v / np.linalg.norm(v)
        payload = SnippetPayload(
            kind=kind, text=f"snippet {n}", source=SOURCES[n % len(SOURCES)], tags=[f"t{n % 4}", "all"],
            content_hash=f"h{n}", image_ref=f"blob{n}" if "image" in names else None, page=n,
            created_at="2024-01-01T00:00:00Z", extra={"n": n},
        )
        points.append(PointRecord(pid(n), {k: v.tolist() for k, v in vecs.items()}, payload))
        vectors[pid(n)] = vecs
    return points, vectors


def brute_force(vectors, name: str, query: np.ndarray, keep=lambda _id: True) -> list[tuple[str, float]]:
    scored = [(i, float(v[name] @ query)) for i, v in vectors.items() if name in v and keep(i)]
    return sorted(scored, key=lambda item: -item[1])


async def test_search_matches_brute_force_and_skips_points_without_the_vector(store: VectorStore) -> None:
    points, vectors = make_points(30)
    await store.upsert(points)
    rng = np.random.default_rng(5)
    for name in ("image", "text"):
        query = rng.normal(size=DIM).astype(np.float32)
        query /= np.linalg.norm(query)
        hits = await store.search(name, query.tolist(), 5)
        expected = brute_force(vectors, name, query)[:5]
        assert [h.id for h in hits] == [i for i, _ in expected]
        np.testing.assert_allclose([h.score for h in hits], [s for _, s in expected], atol=SCORE_ATOL)
        # Only points carrying this vector can be found through it.
        everything = await store.search(name, query.tolist(), 100)
        assert {h.id for h in everything} == {i for i, v in vectors.items() if name in v}


async def test_exact_vector_is_its_own_top_hit(store: VectorStore) -> None:
    points, _ = make_points(12)
    await store.upsert(points)
    for point in points:
        for name, vec in point.vectors.items():
            top = (await store.search(name, vec, 1))[0]
            assert top.id == point.id and top.score == pytest.approx(1.0, abs=SCORE_ATOL)


@pytest.mark.parametrize(
    ("filters", "keep"),
    [
        (SearchFilters(source="notes.md"), lambda n: n % 3 == 2),
        (SearchFilters(tags=["t1"]), lambda n: n % 4 == 1),
        (SearchFilters(tags=["t1", "t2"]), lambda n: n % 4 in (1, 2)),
        (SearchFilters(kind=["image_text"]), lambda n: n % 3 == 2),
        (SearchFilters(kind=["image", "image_text"], tags=["t0"]), lambda n: n % 3 != 1 and n % 4 == 0),
        (SearchFilters(content_hash="h7"), lambda n: n == 7),
        (SearchFilters(content_hash="h8", source="notes.md"), lambda n: n == 8),
        (SearchFilters(content_hash="h9", source="notes.md"), lambda n: False),  # h9 is in "manual.pdf"
        (SearchFilters(content_hash="h"), lambda n: False),  # exact match, not a prefix
    ],
)
async def test_filters_on_search_count_and_scroll(store: VectorStore, filters, keep) -> None:
    points, vectors = make_points(36)
    await store.upsert(points)
    wanted = {pid(n) for n in range(36) if keep(n)}
    query = np.asarray(points[2].vectors["image"], dtype=np.float32)
    hits = await store.search("image", query.tolist(), 100, filters)
    assert [h.id for h in hits] == [i for i, _ in brute_force(vectors, "image", query, lambda i: i in wanted)]
    assert await store.count(filters) == len(wanted)
    page, _ = await store.scroll(limit=100, filters=filters)
    assert {p.id for p in page} == wanted


async def test_retrieve_round_trips_payload_and_keeps_order(store: VectorStore) -> None:
    points, _ = make_points(6)
    await store.upsert(points)
    missing = pid(999)
    got = await store.retrieve([pid(4), missing, pid(1)])
    assert [p.id for p in got] == [pid(4), pid(1)]
    assert got[0].payload == points[4].payload
    assert got[1].payload == points[1].payload
    assert await store.existing_ids([pid(0), missing, pid(5)]) == {pid(0), pid(5)}
    assert await store.retrieve([]) == [] and await store.existing_ids([]) == set()


async def test_upsert_is_idempotent_and_updates_payload(store: VectorStore) -> None:
    points, _ = make_points(5)
    await store.upsert(points)
    await store.upsert(points)
    assert await store.count() == 5
    points[0].payload.text = "changed"
    await store.upsert([points[0]])
    assert (await store.retrieve([pid(0)]))[0].payload.text == "changed"
    assert await store.count() == 5


async def test_delete_and_delete_by_filter(store: VectorStore) -> None:
    points, _ = make_points(12)
    await store.upsert(points)
    assert await store.delete([pid(0), pid(1), pid(999)]) == 2
    assert await store.count() == 10
    assert await store.delete_by_filter(SearchFilters(source="photos/")) == 3  # n = 4, 7, 10
    assert await store.count() == 7
    assert await store.count(SearchFilters(source="photos/")) == 0
    assert await store.delete_by_filter(SearchFilters(source="photos/")) == 0
    with pytest.raises(InvalidInput):
        await store.delete_by_filter(SearchFilters())


async def test_facet_counts(store: VectorStore) -> None:
    points, _ = make_points(10)
    await store.upsert(points)
    assert await store.facet_counts("kind") == {"image": 4, "text": 3, "image_text": 3}
    assert await store.facet_counts("source") == {"manual.pdf": 4, "photos/": 3, "notes.md": 3}
    assert await store.facet_counts("tags") == {"all": 10, "t0": 3, "t1": 3, "t2": 2, "t3": 2}
    with pytest.raises(InvalidInput):
        await store.facet_counts("text")


async def test_facet_counts_drop_values_whose_points_are_all_deleted(store: VectorStore) -> None:
    points, _ = make_points(10)
    await store.upsert(points)
    assert await store.delete_by_filter(SearchFilters(source="photos/")) == 3  # n = 1, 4, 7
    assert await store.delete([pid(n) for n in range(10) if n % 3 == 1 or n == 2]) == 1  # kind "text" gone
    assert await store.facet_counts("source") == {"manual.pdf": 4, "notes.md": 2}
    assert await store.facet_counts("kind") == {"image": 4, "image_text": 2}
    assert await store.facet_counts("content_hash") == {f"h{n}": 1 for n in (0, 3, 5, 6, 8, 9)}


async def test_scroll_pages_cover_everything_once(store: VectorStore) -> None:
    points, _ = make_points(23)
    await store.upsert(points)
    seen: list[str] = []
    offset = None
    for _ in range(10):
        page, offset = await store.scroll(limit=5, offset=offset)
        assert len(page) <= 5
        seen.extend(p.id for p in page)
        if offset is None:
            break
    assert sorted(seen) == sorted(p.id for p in points) and len(seen) == 23


async def test_bad_input_is_invalid_input(store: VectorStore) -> None:
    points, _ = make_points(1)
    with pytest.raises(InvalidInput, match="UUID"):
        await store.upsert([PointRecord("not-a-uuid", points[0].vectors, points[0].payload)])
    with pytest.raises(InvalidInput, match="dimensions"):
        await store.upsert([PointRecord(pid(1), {"text": [0.1] * (DIM + 1)}, points[0].payload)])
    with pytest.raises(InvalidInput, match="no vector"):
        await store.upsert([PointRecord(pid(1), {}, points[0].payload)])
    with pytest.raises(InvalidInput):
        await store.search("audio", [0.1] * DIM, 3)
    assert await store.count() == 0


@pytest.mark.parametrize("kind", STORE_KINDS)
async def test_reopen_keeps_points_and_embedder(kind: str, make_store, embedder, tmp_path: Path) -> None:
    folder = tmp_path / "persist"
    store = await make_store(kind, path=folder)
    points, _ = make_points(9)
    await store.upsert(points)
    await store.close()
    again = await make_store(kind, path=folder, ensure=False)
    assert await again.embedder_id() == embedder.identity
    assert await again.count() == 9
    assert (await again.search("image", points[0].vectors["image"], 1))[0].id == pid(0)
    await again.ensure_collection(embedder.dim, embedder.identity)  # same embedder: fine
    await again.close()
    other = await make_store(kind, path=folder, ensure=False)
    with pytest.raises(Conflict) as caught:
        await other.ensure_collection(embedder.dim, "open_clip:ViT-B-32:laion2b_s34b_b79k:512")
    message = str(caught.value)
    assert embedder.identity in message and "ViT-B-32" in message and TEST_COLLECTION in message
    with pytest.raises(Conflict):
        await other.ensure_collection(embedder.dim + 1, embedder.identity)


@pytest.mark.parametrize("kind", STORE_KINDS)
async def test_missing_collection_reads_empty_and_refuses_writes(kind: str, make_store) -> None:
    store = await make_store(kind, ensure=False)
    assert await store.embedder_id() is None
    assert await store.count() == 0 and await store.facet_counts("kind") == {}
    assert await store.search("text", [0.1] * DIM, 5) == [] and await store.scroll() == ([], None)
    points, _ = make_points(1)
    with pytest.raises(NotFound, match=TEST_COLLECTION):
        await store.upsert(points)


async def test_adapters_agree_on_the_same_calls(make_store) -> None:
    """Congruence: the same writes and queries give the same ids in the same order on both."""
    stores = {kind: await make_store(kind) for kind in STORE_KINDS}
    points, _ = make_points(60, seed=3)
    for store in stores.values():
        await store.upsert(points[:40])
        await store.upsert(points[30:])  # overlapping batch: upsert semantics
        await store.delete([pid(7), pid(8)])
        await store.delete_by_filter(SearchFilters(tags=["t3"], kind=["text"]))
    rng = np.random.default_rng(11)
    queries = [rng.normal(size=DIM) for _ in range(6)]
    filter_sets = [None, SearchFilters(source="manual.pdf"), SearchFilters(tags=["t0", "t2"]),
                   SearchFilters(kind=["image_text"], source="notes.md")]

    async def observe(store: VectorStore) -> tuple[list, list]:
        seen: list = [await store.count(), await store.facet_counts("kind"), await store.facet_counts("tags")]
        scores: list = []
        for query in queries:
            for filters in filter_sets:
                for name in ("image", "text"):
                    hits = await store.search(name, (query / np.linalg.norm(query)).tolist(), 10, filters)
                    seen.append([h.id for h in hits])
                    scores.append([h.score for h in hits])
        page, offset = await store.scroll(limit=7, filters=SearchFilters(tags=["all"]))
        seen.append(([p.id for p in page], offset))
        seen.append([p.payload.to_dict() for p in await store.retrieve([pid(n) for n in range(0, 60, 9)])])
        return seen, scores

    (edge, edge_scores), (local, local_scores) = [await observe(store) for store in stores.values()]
    assert edge == local
    for got, want in zip(edge_scores, local_scores, strict=True):
        np.testing.assert_allclose(got, want, atol=SCORE_ATOL)


@pytest.mark.subprocess
def test_edge_path_locked_by_another_process(tmp_path: Path, embedder) -> None:
    """A second process opening the same embedded store gets StoreUnavailable naming the path."""
    holder = textwrap.dedent(f"""
        import asyncio, sys, time
        from pathlib import Path
        from retriever.store import open_store
        async def main():
            store = await open_store(qdrant_url="", api_key="", path=Path({str(tmp_path)!r}), collection="c")
            await store.ensure_collection({embedder.dim}, {embedder.identity!r})
            print("READY", flush=True)
            sys.stdin.read()  # hold the lock until the test closes our stdin
            await store.close()
        asyncio.run(main())
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
        import asyncio

        with pytest.raises(StoreUnavailable) as caught:
            asyncio.run(open_store(qdrant_url="", api_key="", path=tmp_path, collection="c"))
        assert str(tmp_path / "c") in str(caught.value)
        assert "another vlmrag process" in str(caught.value)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)
    assert proc.returncode == 0


@pytest.mark.subprocess
def test_edge_recovers_points_from_the_wal_after_a_hard_kill(tmp_path: Path, embedder) -> None:
    """Points upserted by a process killed without close() are all back on re-open (WAL replay)."""
    writer = textwrap.dedent(f"""
        import asyncio, os
        from pathlib import Path
        from tests.test_store import make_points
        from retriever.store import open_store
        async def main():
            store = await open_store(qdrant_url="", api_key="", path=Path({str(tmp_path)!r}), collection="c")
            await store.ensure_collection({embedder.dim}, {embedder.identity!r})
            await store.upsert(make_points(25)[0])
            os._exit(0)  # no close(), no flush: only the WAL has the points
        asyncio.run(main())
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-c", writer], env=env, check=True, timeout=60)
    import asyncio

    async def reopen() -> None:
        store = await open_store(qdrant_url="", api_key="", path=tmp_path, collection="c")
        try:
            assert await store.count() == 25
            points, _ = make_points(25)
            top = (await store.search("image", points[3].vectors["image"], 1))[0]
            assert top.id == pid(3) and top.score == pytest.approx(1.0, abs=SCORE_ATOL)
        finally:
            await store.close()

    asyncio.run(reopen())


async def test_edge_opens_a_float32_shard_made_before_float16_storage(tmp_path: Path, embedder) -> None:
    """A shard created with float32 vectors keeps them: it loads, searches exactly and takes writes."""
    import qdrant_edge as qe

    from retriever.store.edge import EdgeStore

    old = EdgeStore(tmp_path, "legacy")
    vectors = {name: qe.EdgeVectorParams(size=DIM, distance=qe.Distance.Cosine) for name in ("image", "text")}
    qe.EdgeShard.create(str(tmp_path / "legacy"), qe.EdgeConfig(vectors=vectors)).close()
    await old.ensure_collection(embedder.dim, embedder.identity)
    points, _ = make_points(6)
    await old.upsert(points)
    await old.close()
    store = EdgeStore(tmp_path, "legacy")
    await store.open()
    try:
        assert await store.count() == 6
        top = (await store.search("image", points[0].vectors["image"], 1))[0]
        assert top.id == pid(0) and top.score == pytest.approx(1.0, abs=1e-5)  # float32: exact
    finally:
        await store.close()


async def test_unreachable_server_is_store_unavailable_naming_the_url(tmp_path: Path) -> None:
    url = "http://127.0.0.1:9"  # discard port: nothing listens
    with pytest.raises(StoreUnavailable, match="127.0.0.1:9"):
        await open_store(qdrant_url=url, api_key="", path=tmp_path, collection="c", timeout_s=3)


# --- the ``lexical`` sparse vector (BM25) -------------------------------------------------------

#: A support corpus: near-identical identifiers (E-417 / E-418, P-100-B / P-100-A), a version.
LEXICAL_TEXTS = (
    "ERROR E-417: pump overheat. Let the pump cool down and check the P-100-B filter.",
    "ERROR E-418: fan failure. Replace the fan assembly.",
    "Part P-100-A: inlet filter for the pump, 40 mm.",
    "Part P-100-B: outlet filter for the pump, 60 mm.",
    "Firmware v2.3.1 fixes the display flicker; update from v2.2.0.",
    "The display shows E417 when the pump is too hot.",
    "Cleaning the water tank once a week keeps the pump quiet.",
    "Warranty: two years on every part except filters.",
    "Error codes start with E, part numbers with P.",
    "E-417 E-417 E-417 pump pump",
    "",  # no tokens: the point gets no lexical vector
    "Descale the boiler every 400 cups.",
)


def make_lexical_points(seed: int = 0) -> list[PointRecord]:
    """One point per LEXICAL_TEXTS entry, with a random text vector and its BM25 document vector."""
    rng = np.random.default_rng(seed)
    points = []
    for n, text in enumerate(LEXICAL_TEXTS):
        vector = rng.normal(size=DIM).astype(np.float32)
        payload = SnippetPayload(kind="text", text=text, source=SOURCES[n % len(SOURCES)], tags=[f"t{n % 2}"])
        lexical = document_vector(text) or None
        points.append(PointRecord(pid(n), {"text": (vector / np.linalg.norm(vector)).tolist()}, payload, lexical))
    return points


async def test_new_collections_have_lexical(store: VectorStore) -> None:
    assert await store.has_lexical() is True


async def test_lexical_search_finds_identifiers_whole_and_by_parts(store: VectorStore) -> None:
    await store.upsert(make_lexical_points())

    async def top(text: str, limit: int = 3, filters: SearchFilters | None = None) -> list[int]:
        hits = await store.search_lexical(query_vector(text), limit, filters)
        assert all(h.score > 0 for h in hits)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        return [int(uuid.UUID(h.id)) - 1 for h in hits]

    # Whole identifiers: the snippet naming it beats the one naming its neighbour E-418 / P-100-A.
    assert (await top("my screen says E-417"))[0] in (0, 9)
    assert (await top("E-418"))[0] == 1
    assert (await top("P-100-A"))[0] == 2
    assert (await top("P-100-B", 2)) == [3, 0]
    # "E417" (no hyphen) and "E-417" are the same identifier; its part "e" alone ranks far lower.
    assert set(await top("E417", 3)) == {0, 5, 9}
    assert 5 in await top("error E-417", 3)
    # By parts: a version by its numbers; a family of parts by its prefix.
    assert (await top("2.3.1"))[0] == 4
    assert set(await top("P-100", 3)) >= {2, 3}
    # Filters apply to lexical search too.
    assert await top("pump", 20, SearchFilters(tags=["t1"])) == [n for n in await top("pump", 20) if n % 2]
    # Nothing to match: no hits.
    assert await store.search_lexical(query_vector("the and of"), 5) == []
    assert await store.search_lexical(SparseVector([], []), 5) == []
    assert await store.search_lexical(query_vector("pump"), 0) == []
    # The point without text has no lexical vector but is still stored and found densely.
    assert await store.count() == len(LEXICAL_TEXTS)


async def test_lexical_follows_upsert_and_delete(store: VectorStore) -> None:
    points = make_lexical_points()
    await store.upsert(points)
    changed = points[1]
    changed.payload.text = "ERROR E-999: unknown"
    changed.lexical = document_vector(changed.payload.text)
    await store.upsert([changed])
    assert (await store.search_lexical(query_vector("E-999"), 5))[0].id == pid(1)
    assert await store.search_lexical(query_vector("fan failure"), 5) == []  # its old words are gone
    await store.delete([pid(1)])
    assert pid(1) not in {h.id for h in await store.search_lexical(query_vector("E-999 unknown"), 20)}


async def test_bad_lexical_vector_is_invalid_input(store: VectorStore) -> None:
    point = make_lexical_points()[0]
    for bad in (SparseVector([1, 2], [0.5]), SparseVector([3, 3], [0.5, 0.5]), SparseVector([-1], [1.0])):
        with pytest.raises(InvalidInput, match="lexical"):
            await store.upsert([PointRecord(point.id, point.vectors, point.payload, bad)])
    assert await store.count() == 0


@pytest.mark.parametrize("kind", STORE_KINDS)
async def test_collection_without_lexical_keeps_working(kind: str, make_store, embedder, tmp_path: Path) -> None:
    """A collection made before ``lexical``: writes drop the BM25 vectors, dense search works, lexical is []."""
    folder = tmp_path / f"old-{kind}"
    if kind == "edge":
        import qdrant_edge as qe

        vectors = {name: qe.EdgeVectorParams(size=DIM, distance=qe.Distance.Cosine) for name in ("image", "text")}
        qe.EdgeShard.create(str(folder / TEST_COLLECTION), qe.EdgeConfig(vectors=vectors)).close()
    else:
        from qdrant_client import AsyncQdrantClient, models

        client = AsyncQdrantClient(path=str(folder))
        await client.create_collection(TEST_COLLECTION, vectors_config={
            name: models.VectorParams(size=DIM, distance=models.Distance.COSINE) for name in ("image", "text")
        })
        await client.close()
    store = await make_store(kind, path=folder)
    assert await store.has_lexical() is False
    points = make_lexical_points()
    await store.upsert(points)
    assert await store.count() == len(points)
    assert (await store.search("text", points[3].vectors["text"], 1))[0].id == pid(3)
    assert await store.search_lexical(query_vector("E-417"), 5) == []


async def test_adapters_agree_on_lexical_search(make_store) -> None:
    """Congruence: the same BM25 vectors give the same ids, order and scores on both adapters.

    After a delete only the hit sets are compared: Edge (the Qdrant engine) keeps a deleted point
    in its IDF statistics until the segment is optimised, qdrant-client's local mode recounts at
    once, so scores drift apart by the IDF of the deleted documents' terms.
    """
    stores = {kind: await make_store(kind) for kind in STORE_KINDS}
    queries = ["E-417", "my screen says E417", "P-100-B filter", "pump", "firmware 2.3.1", "filter pump 60 mm",
               "warranty"]
    filter_sets = [None, SearchFilters(tags=["t0"]), SearchFilters(source="manual.pdf")]

    async def observe(store: VectorStore) -> tuple[list, list]:
        ids, scores = [], []
        for text in queries:
            for filters in filter_sets:
                hits = await store.search_lexical(query_vector(text), 20, filters)
                ids.append([h.id for h in hits])
                scores.append([h.score for h in hits])
        return ids, scores

    for store in stores.values():
        await store.upsert(make_lexical_points())
    (edge_ids, edge_scores), (local_ids, local_scores) = [await observe(store) for store in stores.values()]
    assert edge_ids == local_ids
    assert all(edge_ids[:3]) and edge_ids[0][0] in (pid(0), pid(9))
    for got, want in zip(edge_scores, local_scores, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5)

    for store in stores.values():
        await store.delete([pid(7), pid(3)])
    (edge_ids, _), (local_ids, _) = [await observe(store) for store in stores.values()]
    assert [set(ids) for ids in edge_ids] == [set(ids) for ids in local_ids]
    assert pid(3) not in {i for ids in edge_ids for i in ids}


# --- whole-collection operations: drop, index_info, versions, export/import --------------------


def make_mixed_points() -> list[PointRecord]:
    """Dense-only points of every kind and text points with (and one without) a BM25 vector."""
    dense, _ = make_points(9)
    lexical = [PointRecord(pid(100 + n), p.vectors, p.payload, p.lexical)
               for n, p in enumerate(make_lexical_points(seed=3))]
    return dense + lexical


@pytest.mark.parametrize("kind", STORE_KINDS)
async def test_export_then_import_restores_every_vector_and_payload(kind: str, make_store, tmp_path: Path) -> None:
    source = await make_store(kind)
    points = make_mixed_points()
    await source.upsert(points)
    pages = [page async for page in source.export_points(batch=4)]
    assert len(pages) == -(-len(points) // 4) and all(0 < len(page) <= 4 for page in pages)
    exported = {p.id: p for page in pages for p in page}
    assert set(exported) == {p.id for p in points}
    for want in points:
        got = exported[want.id]
        assert got.payload == want.payload
        assert set(got.vectors) == set(want.vectors)
        for name, vector in want.vectors.items():
            np.testing.assert_allclose(got.vectors[name], vector, atol=SCORE_ATOL)
        if want.lexical:
            assert got.lexical is not None and got.lexical.indices == want.lexical.indices
            np.testing.assert_allclose(got.lexical.values, want.lexical.values, rtol=1e-6)
        else:
            assert not got.lexical

    restored = await make_store(kind, path=tmp_path / "restored")
    assert [await restored.import_points(page) for page in pages] == [len(page) for page in pages]
    assert await restored.count() == len(points)
    assert await restored.facet_counts("kind") == await source.facet_counts("kind")
    for query in ("E-417", "pump filter"):
        want_hits = await source.search_lexical(query_vector(query), 5)
        got_hits = await restored.search_lexical(query_vector(query), 5)
        assert want_hits and [h.id for h in got_hits] == [h.id for h in want_hits]
    for point in points[:9]:
        name = next(iter(point.vectors))
        assert (await restored.search(name, point.vectors[name], 1))[0].id == point.id
    again = {p.id: p for page in [page async for page in restored.export_points()] for p in page}
    assert {i: p.payload for i, p in again.items()} == {i: p.payload for i, p in exported.items()}


@pytest.mark.parametrize("kind", STORE_KINDS)
async def test_export_of_a_missing_collection_is_empty(kind: str, make_store) -> None:
    store = await make_store(kind, ensure=False)
    assert [page async for page in store.export_points()] == []


@pytest.mark.parametrize("kind", STORE_KINDS)
async def test_drop_removes_the_collection(kind: str, make_store, tmp_path: Path) -> None:
    folder = tmp_path / "dropped"
    store = await make_store(kind, path=folder)
    await store.upsert(make_points(6)[0])
    await store.drop()
    again = await make_store(kind, path=folder, ensure=False)
    assert await again.embedder_id() is None and await again.count() == 0
    if kind == "edge":
        assert not (folder / TEST_COLLECTION).exists()


@pytest.mark.parametrize("kind", STORE_KINDS)
async def test_index_info_counts_points_and_says_who_builds_hnsw(kind: str, make_store) -> None:
    from retriever.store.hnsw import HnswParams

    store = await make_store(kind)
    empty = await store.index_info()
    assert set(empty) == {"points", "segments", "indexed_vectors"} and empty["points"] == 0
    await store.upsert(make_points(9)[0])
    info = await store.index_info()
    assert info["points"] == 9 and info["segments"] >= 1 and 0 <= info["indexed_vectors"] <= 2 * 9
    assert store.local_index_build is (kind == "edge")
    if kind != "edge":
        with pytest.raises(InvalidInput, match="builds HNSW itself"):
            await store.build_index(HnswParams())


@pytest.mark.parametrize("kind", STORE_KINDS)
async def test_versions_name_the_served_collection(kind: str, make_store) -> None:
    store = await make_store(kind)
    versions = store.versions()
    assert await versions.current() == TEST_COLLECTION
    assert await versions.versions() == [TEST_COLLECTION]


def test_a_bad_passage_row_is_named_with_its_own_length() -> None:
    """A sections multi-vector with one wrong row: the error names that row and its length."""
    from retriever.store.base import check_vectors

    rows = [[0.1] * 4, [0.1] * 4, [0.1] * 3]
    point = PointRecord("p1", {"image": [0.0] * 8, "passage": rows}, SnippetPayload(kind="text"))
    with pytest.raises(InvalidInput, match=r"vector 'passage' row 2 has 3 dimensions, expected 4"):
        check_vectors([point], 8, passage_dim=4)
    single = PointRecord("p2", {"image": [0.0] * 8, "passage": [0.1] * 5}, SnippetPayload(kind="text"))
    with pytest.raises(InvalidInput, match=r"vector 'passage' has 5 dimensions, expected 4"):
        check_vectors([single], 8, passage_dim=4)
    check_vectors([PointRecord("p3", {"image": [0.0] * 8, "passage": rows[:2]}, SnippetPayload(kind="text"))],
                  8, passage_dim=4)
