"""Retriever: query embedding, multi-vector search and RRF fusion, on both store adapters."""

from __future__ import annotations

import hashlib
import uuid

import numpy as np
import pytest

from retriever.errors import InvalidInput
from retriever.plan import RetrievalPlan
from retriever.search import Retriever, list_name, rrf_fuse
from retriever.store.base import VectorStore
from retriever.types import PointRecord, ScoredPoint, SearchFilters, SnippetPayload

CAPTIONS = [
    "a blue gradient fading into red", "green and yellow stripes", "a black and white checkerboard",
    "an orange square with a purple corner", "television static number one", "television static number two",
]
PASSAGES = [
    "To reset the router hold the button for ten seconds.",
    "The warranty covers parts and labour for two years.",
    "Clean the filter every month with warm water.",
    "Error E4 means the water inlet is blocked.",
]


def point_id(label: str) -> str:
    return str(uuid.UUID(hashlib.sha256(label.encode()).hexdigest()[:32]))


@pytest.fixture(scope="module")
def corpus(embedder, sample_images) -> tuple[list[PointRecord], dict[str, str]]:
    """Images (every other one captioned) and text passages as points, embedded once."""
    image_vecs = embedder.embed_images(sample_images)
    caption_vecs = embedder.embed_texts(CAPTIONS)
    passage_vecs = embedder.embed_texts(PASSAGES)
    ids: dict[str, str] = {}
    points = []
    for n, (image_vec, caption, caption_vec) in enumerate(zip(image_vecs, CAPTIONS, caption_vecs)):
        ids[f"image{n}"] = point_id(f"image{n}")
        with_caption = n % 2 == 0
        vectors = {"image": image_vec.tolist(), **({"text": caption_vec.tolist()} if with_caption else {})}
        payload = SnippetPayload(kind="image_text" if with_caption else "image", text=caption if with_caption else "",
                                 source="gallery" if n < 3 else "static", tags=["pictures", f"p{n}"])
        points.append(PointRecord(ids[f"image{n}"], vectors, payload))
    for n, (passage, vec) in enumerate(zip(PASSAGES, passage_vecs)):
        ids[f"text{n}"] = point_id(f"text{n}")
        points.append(PointRecord(ids[f"text{n}"], {"text": vec.tolist()},
                                  SnippetPayload(kind="text", text=passage, source="manual.md", tags=["manual"])))
    return points, ids


@pytest.fixture
async def indexed(store: VectorStore, embedder, corpus) -> tuple[Retriever, dict[str, str]]:
    """The corpus upserted into ``store`` (both adapters); returns the retriever and the id map."""
    points, ids = corpus
    await store.upsert(points)
    return Retriever(embedder, store, rrf_k=60), ids


async def test_an_ingested_image_is_its_own_top_hit(indexed, sample_images) -> None:
    retriever, ids = indexed
    for n, image in enumerate(sample_images):
        result = await retriever.search(None, [image], plan=RetrievalPlan(pool=5))
        top = result.candidates[0]
        assert top.id == ids[f"image{n}"]
        assert top.vector_scores[list_name("image", "image")] == pytest.approx(1.0, abs=1e-3)
        assert set(top.vector_scores) <= {"image->image", "image->text"}


async def test_exact_passage_text_finds_its_snippet(indexed) -> None:
    retriever, ids = indexed
    for n, passage in enumerate(PASSAGES):
        result = await retriever.search(passage, [], plan=RetrievalPlan(pool=10))
        top_ids = [c.id for c in result.candidates[:3]]
        assert ids[f"text{n}"] in top_ids
        hit = next(c for c in result.candidates if c.id == ids[f"text{n}"])
        assert hit.vector_scores["text->text"] == pytest.approx(1.0, abs=1e-3)
        assert hit.payload.text == passage


async def test_text_query_searches_both_vectors(indexed) -> None:
    retriever, ids = indexed
    result = await retriever.search(CAPTIONS[0], [], plan=RetrievalPlan(pool=20, fusion="rrf"))  # RRF's scaled score
    keys = set().union(*(c.vector_scores for c in result.candidates))
    assert keys == {"text->image", "text->text"}
    # Images without captions are reachable from text only through the image vector.
    uncaptioned = next(c for c in result.candidates if c.id == ids["image1"])
    assert set(uncaptioned.vector_scores) == {"text->image"}
    assert len(result.candidates) == len(CAPTIONS) + len(PASSAGES)
    assert [c.rank for c in result.candidates] == list(range(1, len(result.candidates) + 1))
    scores = [c.clip_score for c in result.candidates]
    assert scores == sorted(scores, reverse=True) and 0 < scores[-1] and scores[0] <= 1.0
    assert set(result.timings) >= {"embed", "search"} and all(v >= 0 for v in result.timings.values())


async def test_text_and_image_query_fuses_four_lists(indexed, sample_images) -> None:
    retriever, ids = indexed
    for fusion in ("rrf", "evidence"):
        result = await retriever.search(CAPTIONS[2], [sample_images[2]], plan=RetrievalPlan(pool=5, fusion=fusion))
        top = result.candidates[0]
        assert top.id == ids["image2"]  # matches the caption exactly and is the image itself
        assert set(top.vector_scores) == {"text->image", "text->text", "image->image", "image->text"}
        assert top.clip_score == pytest.approx(1.0)  # ranked first in all four lists (the rrf score either way)
        assert [c.rank for c in result.candidates] == list(range(1, len(result.candidates) + 1))


async def test_filters_are_respected(indexed, sample_images) -> None:
    retriever, _ = indexed
    cases = [
        (SearchFilters(source="static"), lambda c: c.payload.source == "static"),
        (SearchFilters(tags=["manual"]), lambda c: "manual" in c.payload.tags),
        (SearchFilters(kind=["image", "text"]), lambda c: c.payload.kind in ("image", "text")),
    ]
    for filters, ok in cases:
        result = await retriever.search("water", [sample_images[0]], plan=RetrievalPlan(pool=20, filters=filters))
        assert result.candidates and all(ok(c) for c in result.candidates)


async def test_several_query_images_are_averaged(indexed, embedder, sample_images) -> None:
    retriever, ids = indexed
    query = await retriever.embed_query(None, sample_images[:2])
    expected = embedder.embed_images(sample_images[:2]).sum(axis=0)
    np.testing.assert_allclose(query.image, expected / np.linalg.norm(expected), atol=1e-6)
    assert query.text is None
    result = await retriever.search_vectors(query, RetrievalPlan(pool=3, fusion="rrf"))  # ranks, not evidence
    assert {ids["image0"], ids["image1"]} <= {c.id for c in result[:3]}


async def test_pool_limits_candidates(indexed) -> None:
    retriever, _ = indexed
    assert len((await retriever.search("router", [], plan=RetrievalPlan(pool=2))).candidates) == 2


async def test_empty_query_and_bad_pool_are_invalid(indexed) -> None:
    retriever, _ = indexed
    with pytest.raises(InvalidInput):
        await retriever.search("   ", [], plan=RetrievalPlan(pool=5))
    with pytest.raises(InvalidInput):
        await retriever.search("x", [], plan=RetrievalPlan(pool=0))


def _hits(*ids_scores: tuple[str, float]) -> list[ScoredPoint]:
    return [ScoredPoint(i, s, SnippetPayload(kind="text")) for i, s in ids_scores]


def test_rrf_fuse_takes_the_best_field_per_query_part_and_sums_parts() -> None:
    lists = {
        "text->image": _hits(("a", 0.31), ("b", 0.30), ("c", 0.29)),
        "text->text": _hits(("b", 0.90), ("d", 0.80)),
        "image->image": _hits(("c", 0.95), ("a", 0.85)),
    }
    fused = rrf_fuse(lists, rrf_k=60, limit=10)
    by_id = {c.id: c for c in fused}
    # b: best text rank 1 (text->text), no image part; a: text rank 1 + image rank 2.
    assert by_id["a"].clip_score == pytest.approx((1 / 61 + 1 / 62) * 61 / 2)
    assert by_id["b"].clip_score == pytest.approx((1 / 61) * 61 / 2)
    assert by_id["c"].clip_score == pytest.approx((1 / 63 + 1 / 61) * 61 / 2)
    assert [c.id for c in fused] == ["a", "c", "b", "d"]
    assert by_id["b"].vector_scores == {"text->image": 0.30, "text->text": 0.90}
    assert [c.rank for c in fused] == [1, 2, 3, 4]
    assert [c.id for c in rrf_fuse(lists, rrf_k=60, limit=2)] == ["a", "c"]


def test_rrf_fuse_does_not_reward_a_second_vector_over_an_exact_match() -> None:
    lists = {
        "image->image": _hits(("uncaptioned", 1.0), ("captioned", 0.9)),
        "image->text": _hits(("captioned", 0.4), ("passage", 0.3)),
    }
    fused = rrf_fuse(lists, rrf_k=60, limit=5)
    # uncaptioned and captioned both rank first somewhere: the tie goes to the exact match.
    assert [c.id for c in fused] == ["uncaptioned", "captioned", "passage"]
    assert fused[0].clip_score == pytest.approx(1.0) and fused[1].clip_score == pytest.approx(1.0)
    assert fused[2].clip_score == pytest.approx(61 / 62)


def test_rrf_fuse_breaks_remaining_ties_by_id() -> None:
    lists = {"image->image": _hits(("y", 0.5)), "image->text": _hits(("x", 0.5))}
    assert [c.id for c in rrf_fuse(lists, rrf_k=60, limit=5)] == ["x", "y"]
    assert rrf_fuse({}, rrf_k=60, limit=5) == []
