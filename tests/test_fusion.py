"""Fusion methods (retriever/fusion.py): a flat list counts less than a peaked one; Qdrant's DBSF normalises."""

from __future__ import annotations

import random
from itertools import pairwise

from retriever.evidence import evidence_relevancy
from retriever.fusion import FUSIONS, MIN_WEIGHT, dbsf, evidence, fuse, list_weight, rrf, weighted_rrf
from retriever.types import ScoredPoint, SnippetPayload


def hits(scores: dict[str, float], texts: dict[str, str] | None = None) -> list[ScoredPoint]:
    ordered = sorted(scores.items(), key=lambda kv: -kv[1])
    return [ScoredPoint(pid, score, SnippetPayload(kind="text", text=(texts or {}).get(pid, pid))) for pid, score in ordered]


def flat_list(seed: int, n: int = 20) -> dict[str, float]:
    rng = random.Random(seed)
    return {f"d{i}": 0.9 + rng.gauss(0, 0.01) for i in range(n)}


def test_a_flat_list_weighs_little_and_a_peaked_one_fully() -> None:
    flat = [list_weight(list(flat_list(seed).values())) for seed in range(40)]
    assert sum(flat) / len(flat) < 0.35  # a random list of 20: its best ~2.8 MADs out, sometimes more
    peaked = [4.56] + [0.19 + 0.001 * i for i in range(19)]  # an exact BM25 match among near-zero hits
    assert list_weight(peaked) == 1.0
    assert list_weight([3.0, 1.0]) == 1.0  # too short to judge: BM25 finding two pages is informative
    assert list_weight([0.5] * 10) == MIN_WEIGHT


def test_weighted_rrf_lets_the_exact_match_beat_a_flat_lists_first() -> None:
    # one query part (a photo): image->image is flat noise, image->lexical found the page exactly
    dense = flat_list(2)
    dense["page"] = 0.88  # the page is low in the flat list
    lexical = {"page": 4.56, **{f"d{i}": 0.19 for i in range(5)}}
    lists = {"image->image": hits(dense), "image->lexical": hits(lexical)}
    plain = rrf(lists, 60, 10)
    weighted = weighted_rrf(lists, 60, 10)
    assert weighted[0].id == "page"
    # best-field RRF: the flat list's rank 1 ties the exact match (both a rank-1 reciprocal); the page
    # wins only by the tie-break, and the flat list's ranks 2.. crowd the pool above BM25's rank 2
    assert plain[0].clip_score == plain[1].clip_score
    assert weighted[0].clip_score > weighted[1].clip_score


def test_dbsf_normalises_each_list_by_its_distribution() -> None:
    lists = {"text->text": hits({"a": 0.9, "b": 0.5, "c": 0.1}), "text->lexical": hits({"c": 10.0, "a": 1.0})}
    fused = dbsf(lists, 60, 5)
    assert {c.id for c in fused} == {"a", "b", "c"}
    assert all(0.0 < c.clip_score <= 1.0 for c in fused)
    assert fused[0].vector_scores == {"text->text": 0.9, "text->lexical": 1.0} or fused[0].id == "c"


def test_every_method_is_reachable_by_name_and_keeps_the_pool_limit() -> None:
    lists = {"text->text": hits({f"p{i}": 1 - i / 30 for i in range(30)})}
    for name in FUSIONS:
        out = fuse(lists, 60, 7, name)
        assert len(out) == 7 and [c.rank for c in out] == list(range(1, 8))
        assert out[0].id == "p0"
    assert fuse({}, 60, 5, "weighted_rrf") == [] and fuse({}, 60, 5, "dbsf") == []


def photo_question_lists() -> tuple[dict[str, list[ScoredPoint]], dict[str, str]]:
    """A display photo (OCR read "PURECHILL 2800 ERR E-182") asked "what does this mean?": the text part's
    lists match generic words, the CLIP lists are flat noise, BM25 on the OCR text found the page."""
    texts = {"page": "PureChill 2800 error codes E-180 to E-182: E-182 means the fan is blocked.",
             **{f"d{i}": f"PureChill 2800 manual section {i}" for i in range(20)},
             **{f"g{i}": f"What the ring colours mean, guide {i}" for i in range(20)}}
    dense = flat_list(3)  # d0..d19
    lexical_image = {"page": 26.7, **{f"d{i}": 11.0 - i * 0.1 for i in range(12)}}
    lexical_text = {f"g{i}": 3.1 - i * 0.01 for i in range(20)}  # "mean"
    passage = {f"g{i}": 0.37 - i * 0.005 for i in range(20)}
    lists = {"text->image": hits(flat_list(4), texts), "text->passage": hits(passage, texts),
             "text->lexical": hits(lexical_text, texts), "image->image": hits(dense, texts),
             "image->lexical": hits(lexical_image, texts)}
    return lists, texts


def test_rank_fusion_drops_the_exact_match_that_evidence_puts_first() -> None:
    # With k=60 rank 20 is worth 3/4 of rank 1: every snippet two lists return (a flat CLIP list and a
    # generic word) outscores BM25's exact page, which only one list has; a pool of 5 loses it.
    lists, _ = photo_question_lists()
    question, read = "what does this mean?", "PURECHILL 2800\nERR E-182"
    assert "page" not in [c.id for c in rrf(lists, 60, 5)]
    fused = evidence(lists, 60, 5, text=question, image_text=read)
    assert fused[0].id == "page"  # it holds every identifier of the query: relevancy >= 0.95
    assert [c.rank for c in fused] == [1, 2, 3, 4, 5]
    assert fuse(lists, 60, 5, text=question, image_text=read)[0].id == "page"  # the default method


def test_evidence_order_is_the_evidence_relevancy_of_every_hit() -> None:
    lists, _ = photo_question_lists()
    question, read = "what does this mean?", "PURECHILL 2800\nERR E-182"
    everything = weighted_rrf(lists, 60, 1000)
    relevancy = evidence_relevancy(question, read, everything)
    fused = evidence(lists, 60, 1000, text=question, image_text=read)
    assert {c.id for c in fused} == {c.id for c in everything}  # every list's hits, none lost
    assert [relevancy[c.id] for c in fused] == sorted(relevancy.values(), reverse=True)
    assert relevancy[fused[0].id] >= 0.95
    # ties keep weighted_rrf's order; clip_score is the rrf score (1.0: first in every part's lists)
    wrrf = {c.id: c for c in everything}
    plain = {c.id: c.clip_score for c in rrf(lists, 60, 1000)}
    assert all(c.clip_score == plain[c.id] for c in fused)
    for a, b in pairwise(fused):
        if relevancy[a.id] == relevancy[b.id]:
            assert wrrf[a.id].rank < wrrf[b.id].rank
