"""Adaptive selection: worked examples and hypothesis properties."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retriever.errors import InvalidInput
from retriever.selection import (
    DROP_REASONS,
    REASON_MIN_K,
    apply_selection,
    select_adaptive,
    sort_key,
)
from retriever.types import Candidate, SnippetPayload


def cand(cid: str, relevancy: float | None, clip: float = 0.0) -> Candidate:
    return Candidate(id=cid, payload=SnippetPayload(kind="text", text=cid), clip_score=clip, relevancy=relevancy)


def ids(items: list[Candidate]) -> list[str]:
    return [c.id for c in items]


# ---------------------------------------------------------------------------------- examples
def test_threshold_and_k() -> None:
    cands = [cand("a", 0.2), cand("b", 0.9), cand("c", 0.7), cand("d", 0.6), cand("e", 0.55)]
    sel = select_adaptive(cands, k=3, threshold=0.5)
    assert ids(sel.kept) == ["b", "c", "d"]
    assert ids(sel.dropped) == ["e", "a"]
    assert sel.reasons == {"e": "over_k", "a": "below_threshold"}
    assert sel.reason(cands[1]) is None


def test_margin_is_relative_to_best() -> None:
    cands = [cand("a", 0.95), cand("b", 0.9), cand("c", 0.7)]
    sel = select_adaptive(cands, k=5, threshold=0.5, margin=0.1)
    assert ids(sel.kept) == ["a", "b"]
    assert sel.reasons == {"c": "outside_margin"}


def test_nothing_passes_keeps_nothing() -> None:
    sel = select_adaptive([cand("a", 0.1), cand("b", 0.3)], k=5, threshold=0.5)
    assert sel.kept == [] and ids(sel.dropped) == ["b", "a"]


def test_min_k_fills_from_best_of_rest_and_k_wins() -> None:
    cands = [cand("a", 0.1), cand("b", 0.3), cand("c", 0.8), cand("d", None, clip=9.0)]
    sel = select_adaptive(cands, k=3, threshold=0.5, min_k=2)
    assert ids(sel.kept) == ["c", "b"]
    assert sel.reasons == {"b": REASON_MIN_K, "a": "below_threshold", "d": "unscored"}
    # min_k larger than k: k wins
    sel = select_adaptive(cands, k=1, threshold=0.9, min_k=4)
    assert ids(sel.kept) == ["c"] and sel.reasons["c"] == REASON_MIN_K


def test_ties_break_on_clip_score_then_id() -> None:
    cands = [cand("z", 0.7, clip=0.1), cand("y", 0.7, clip=0.3), cand("x", 0.7, clip=0.1)]
    sel = select_adaptive(cands, k=2, threshold=0.0)
    assert ids(sel.kept) == ["y", "x"]
    assert sel.reasons == {"z": "over_k"}


def test_unscored_and_nan_are_dropped_last() -> None:
    cands = [cand("n", math.nan), cand("u", None), cand("s", 0.6)]
    sel = select_adaptive(cands, k=5, threshold=0.5)
    assert ids(sel.kept) == ["s"]
    assert sel.reasons == {"n": "unscored", "u": "unscored"}


def test_apply_selection_writes_kept_and_reason() -> None:
    cands = [cand("a", 0.2), cand("b", 0.9)]
    apply_selection(select_adaptive(cands, k=3, threshold=0.5))
    assert (cands[1].kept, cands[1].reason) == (True, None)
    assert (cands[0].kept, cands[0].reason) == (False, "below_threshold")


@pytest.mark.parametrize(
    "kwargs", [{"k": -1, "threshold": 0.5}, {"k": 1, "threshold": math.nan},
               {"k": 1, "threshold": 0.5, "margin": -0.1}, {"k": 1, "threshold": 0.5, "min_k": -2}],
)
def test_bad_parameters_raise_invalid_input(kwargs: dict) -> None:
    with pytest.raises(InvalidInput):
        select_adaptive([cand("a", 0.5)], **kwargs)


def test_duplicate_ids_raise_invalid_input() -> None:
    with pytest.raises(InvalidInput):
        select_adaptive([cand("a", 0.5), cand("a", 0.6)], k=2, threshold=0.1)


# -------------------------------------------------------------------------------- properties
scores = st.one_of(st.none(), st.floats(0.0, 1.0), st.sampled_from([0.0, 0.5, 1.0, math.nan]))
clips = st.floats(-1.0, 1.0)


@st.composite
def candidate_lists(draw: st.DrawFn) -> list[Candidate]:
    n = draw(st.integers(0, 25))
    return [cand(f"c{i:02d}", draw(scores), draw(clips)) for i in range(n)]


params = {
    "k": st.integers(0, 10),
    "threshold": st.floats(0.0, 1.0),
    "margin": st.one_of(st.none(), st.floats(0.0, 1.0)),
    "min_k": st.integers(0, 6),
}


@settings(max_examples=300, deadline=None)
@given(candidate_lists(), st.fixed_dictionaries(params), st.randoms())
def test_selection_properties(cands: list[Candidate], p: dict, rnd) -> None:
    sel = select_adaptive(cands, **p)
    kept, dropped = sel.kept, sel.dropped
    # never more than k; at least min(min_k, k, len) whenever there is something to fill from
    assert len(kept) <= p["k"]
    assert len(kept) >= min(p["min_k"], p["k"], len(cands))
    # kept ∪ dropped = candidates, disjoint (same objects)
    assert sorted(map(id, kept + dropped)) == sorted(map(id, cands))
    assert len({c.id for c in kept} | {c.id for c in dropped}) == len(cands)
    # every regularly kept candidate passed the threshold and the margin
    usable = [c.relevancy for c in cands if c.relevancy is not None and not math.isnan(c.relevancy)]
    best = max(usable) if usable else None
    for c in kept:
        if sel.reasons.get(c.id) == REASON_MIN_K:
            continue
        assert c.relevancy is not None and c.relevancy >= p["threshold"]
        if p["margin"] is not None:
            assert c.relevancy >= best - p["margin"]
    # kept and dropped are sorted best first; every dropped one has a known reason
    assert [sort_key(c) for c in kept] == sorted(sort_key(c) for c in kept)
    assert [sort_key(c) for c in dropped] == sorted(sort_key(c) for c in dropped)
    assert all(sel.reasons[c.id] in DROP_REASONS for c in dropped)
    # min_k fillers only exist when the regular rules kept fewer than min_k
    fillers = [c for c in kept if sel.reasons.get(c.id) == REASON_MIN_K]
    assert len(kept) - len(fillers) < p["min_k"] or not fillers
    # idempotent and independent of input order
    shuffled = list(cands)
    rnd.shuffle(shuffled)
    again = select_adaptive(shuffled, **p)
    assert ids(again.kept) == ids(kept) and ids(again.dropped) == ids(dropped)
    assert again.reasons == sel.reasons
    twice = select_adaptive(kept + dropped, **p)
    assert ids(twice.kept) == ids(kept) and twice.reasons == sel.reasons
