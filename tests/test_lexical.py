"""BM25 vectors and identifier-aware tokenisation (retriever/lexical.py)."""

from __future__ import annotations

import math

import pytest

from retriever.lexical import (
    MAX_TEXT_CHARS,
    document_vector,
    expand_identifiers,
    identifier_tokens,
    query_vector,
)
from retriever.types import SparseVector


def tokens(text: str) -> set[int]:
    return set(query_vector(text).indices)


def bm25_rank(query: str, docs: list[str]) -> list[tuple[int, float]]:
    """Score docs the way the stores do: sum over shared tokens of IDF x document weight."""
    vectors = [dict(zip(d.indices, d.values, strict=True)) for d in map(document_vector, docs)]
    n = len(docs)

    def idf(token: int) -> float:
        df = sum(token in v for v in vectors)
        return math.log((n - df + 0.5) / (df + 0.5) + 1)

    q = query_vector(query)
    scores = [sum(idf(t) * v[t] for t in q.indices if t in v) for v in vectors]
    return sorted(((i, s) for i, s in enumerate(scores) if s > 0), key=lambda item: -item[1])


@pytest.mark.parametrize(
    ("text", "extra"),
    [
        ("E-417", ["e417"]),
        ("E417", ["e", "417"]),
        ("P-100-B", ["p100", "p100b", "100b"]),
        ("v2.3.1", ["v", "2", "v23", "v231", "23", "231", "31"]),
        ("see E-417.", ["e417"]),  # sentence punctuation is not part of it
        ("pump P_100/B", ["p100", "p100b", "100b"]),
        ("E-417 and E-417", ["e417", "e417"]),  # once per occurrence: term frequency is kept
        ("417 pump well-known and/or", []),  # no digits, or nothing to split: not identifiers
        ("sha 3f2a9c0d1e7b4a6f8e9d0c1b2a3f4e5d", []),  # one token already, too many parts to split
        ("SN 12-ab-34-cd-56-ef-78", ["12ab34cd56ef78"]),  # long: only the whole
    ],
)
def test_identifier_tokens(text: str, extra: list[str]) -> None:
    assert identifier_tokens(text) == extra


def test_spellings_of_one_identifier_give_the_same_vectors() -> None:
    for a, b in [("E-417", "E417"), ("e-417", "E-417"), ("(E-417)", "E-417."), ("P-100-B", "P100B"),
                 ("P-100-B", "p_100_b")]:
        assert query_vector(a) == query_vector(b), (a, b)
        assert document_vector(f"code {a} shown") == document_vector(f"code {b} shown"), (a, b)
    assert query_vector("E-417") == query_vector("e 417 e417")  # a query has each token once


def test_the_raw_tokenizer_splits_identifiers_badly() -> None:
    """Why the expansion exists: raw BM25 makes E-417 and E417 disjoint and E-417 ~ E-418."""
    import qdrant_edge as qe

    raw = qe.Bm25()
    assert not set(raw.embed_query("E417").indices) & set(raw.embed_query("E-417").indices)
    assert set(raw.embed_query("E-417").indices) & set(raw.embed_query("E-418").indices)  # "e"
    assert set(raw.embed_query("P-100-A").indices) == set(raw.embed_query("P-100").indices)  # "a": stop word
    # With the expansion the whole identifier has a token of its own.
    assert tokens("P-100-A") > tokens("P-100") and tokens("E-417") - tokens("E-418")


DOCS = [
    "ERROR E-417: pump overheat",  # 0
    "ERROR E-418: fan failure",  # 1
    "Part P-100-A inlet filter",  # 2
    "Part P-100-B outlet filter",  # 3
    "Firmware v2.3.1 release notes",  # 4
    "Hose length 417 mm",  # 5
    "Firmware v2.2.0 release notes",  # 6
    "Error codes start with E",  # 7
]


@pytest.mark.parametrize(
    ("query", "first"),
    [
        ("my screen says E-417", 0), ("E417", 0), ("E-418", 1), ("P-100-A", 2), ("P-100-B", 3), ("p100b", 3),
        ("v2.3.1", 4), ("firmware 2.3.1", 4), ("v2.2.0", 6),
    ],
)
def test_whole_identifiers_rank_their_snippet_first(query: str, first: int) -> None:
    ranking = bm25_rank(query, DOCS)
    assert ranking[0][0] == first
    if len(ranking) > 1:
        assert ranking[0][1] > ranking[1][1]  # strictly: no tie with a near-identical identifier


@pytest.mark.parametrize(
    ("query", "found"),
    [("417", {0, 5}), ("P-100", {2, 3}), ("100-B", {3}), ("2.3", {4}), ("v2", {4, 6})],
)
def test_identifiers_match_by_parts(query: str, found: set[int]) -> None:
    ranked = [i for i, _ in bm25_rank(query, DOCS)]
    assert set(ranked[: len(found)]) == found


def test_words_still_stem_and_drop_stop_words() -> None:
    assert tokens("pumps errors") == tokens("pump error")
    assert query_vector("the and of") == SparseVector([], [])
    assert document_vector("") == SparseVector([], []) and query_vector("   ") == SparseVector([], [])


def test_document_weights_follow_term_frequency() -> None:
    once, thrice = document_vector("pump E-417"), document_vector("pump E-417 E-417 E-417")
    weight = dict(zip(thrice.indices, thrice.values, strict=True))
    e417 = (tokens("E-417") - tokens("E")) - tokens("417")
    assert len(e417) == 1
    (token,) = e417
    assert weight[token] > dict(zip(once.indices, once.values, strict=True))[token]
    assert set(query_vector("E-417 E-417").values) == {1.0}  # a query counts each token once


def test_huge_text_is_capped() -> None:
    text = "pump " * (MAX_TEXT_CHARS // 5) + "E-999"
    assert "e999" not in expand_identifiers(text)
    assert len(document_vector(text)) >= 1
