"""Adaptive up-to-k selection of scored candidates: a pure function, no I/O, no mutation.

Rules, applied to the candidates sorted by relevancy (best first; ties by CLIP score, then id):

1. a candidate without a usable relevancy (None or NaN) is dropped as ``"unscored"``;
2. relevancy < ``threshold`` is dropped as ``"below_threshold"``;
3. with a ``margin``, relevancy < best - margin is dropped as ``"outside_margin"`` (best = the
   highest relevancy among all candidates);
4. once ``k`` are kept, the rest are dropped as ``"over_k"``;
5. if fewer than ``min_k`` are kept, the best of the dropped ones are kept anyway, with the
   reason ``"min_k"`` (so a caller can tell them apart). ``min_k`` never exceeds ``k``: when a
   request asks for more, ``k`` wins.

The result lists the same objects it was given; ``apply_selection`` writes ``kept``/``reason``
onto mutable candidates (``retriever.types.Candidate``) for callers that want that.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from retriever.errors import InvalidInput
from retriever.types import Candidate

REASON_UNSCORED = "unscored"
REASON_BELOW_THRESHOLD = "below_threshold"
REASON_OUTSIDE_MARGIN = "outside_margin"
REASON_OVER_K = "over_k"
REASON_MIN_K = "min_k"  # kept although it failed a rule, to reach min_k
DROP_REASONS = (REASON_UNSCORED, REASON_BELOW_THRESHOLD, REASON_OUTSIDE_MARGIN, REASON_OVER_K)


class ScoredCandidateLike(Protocol):
    """What selection reads from a candidate."""

    @property
    def id(self) -> str: ...

    @property
    def relevancy(self) -> float | None: ...

    @property
    def clip_score(self) -> float: ...


C = TypeVar("C", bound=ScoredCandidateLike)


@dataclass(slots=True)
class Selection(Generic[C]):
    """Kept (best first) and dropped (best first) candidates, with a reason per id."""

    kept: list[C]
    dropped: list[C]
    reasons: dict[str, str] = field(default_factory=dict)  # dropped ids, and min_k-filled kept ids

    def reason(self, candidate: ScoredCandidateLike) -> str | None:
        """Why ``candidate`` was dropped (or ``"min_k"``); None for a regularly kept one."""
        return self.reasons.get(candidate.id)


def _usable(score: float | None) -> bool:
    return score is not None and not math.isnan(score)


def sort_key(candidate: ScoredCandidateLike) -> tuple[int, float, float, str]:
    """Best first: scored before unscored, relevancy desc, CLIP score desc, id asc."""
    rel = candidate.relevancy
    clip = candidate.clip_score if not math.isnan(candidate.clip_score) else -math.inf
    if not _usable(rel):
        return (1, 0.0, -clip, candidate.id)
    return (0, -float(rel), -clip, candidate.id)  # type: ignore[arg-type]


def _validate(k: int, threshold: float, margin: float | None, min_k: int) -> None:
    if k < 0:
        raise InvalidInput(f"k must be >= 0, got {k}", param="k")
    if min_k < 0:
        raise InvalidInput(f"min_k must be >= 0, got {min_k}", param="min_k")
    if math.isnan(threshold):
        raise InvalidInput("threshold must be a number", param="threshold")
    if margin is not None and (math.isnan(margin) or margin < 0):
        raise InvalidInput(f"margin must be >= 0, got {margin}", param="margin")


def select_adaptive(
    candidates: Sequence[C], *, k: int, threshold: float, margin: float | None = None, min_k: int = 0,
) -> Selection[C]:
    """Keep up to ``k`` candidates with relevancy >= ``threshold`` (and within ``margin`` of the best)."""
    _validate(k, threshold, margin, min_k)
    ids = [c.id for c in candidates]
    if len(set(ids)) != len(ids):
        raise InvalidInput("candidate ids must be unique", param="candidates")
    ordered = sorted(candidates, key=sort_key)
    scores = [float(c.relevancy) for c in ordered if _usable(c.relevancy)]  # type: ignore[arg-type]
    best = scores[0] if scores else None

    kept: list[C] = []
    dropped: list[C] = []
    reasons: dict[str, str] = {}
    for cand in ordered:
        rel = cand.relevancy
        if not _usable(rel):
            reason: str | None = REASON_UNSCORED
        elif rel < threshold:  # type: ignore[operator]
            reason = REASON_BELOW_THRESHOLD
        elif margin is not None and best is not None and rel < best - margin:  # type: ignore[operator]
            reason = REASON_OUTSIDE_MARGIN
        elif len(kept) >= k:
            reason = REASON_OVER_K
        else:
            reason = None
        if reason is None:
            kept.append(cand)
        else:
            dropped.append(cand)
            reasons[cand.id] = reason

    # min_k: top up from the best of the dropped ones ("over_k" cannot occur here: then len(kept) == k).
    want = min(min_k, k)
    while len(kept) < want and dropped:
        filler = dropped.pop(0)
        kept.append(filler)
        reasons[filler.id] = REASON_MIN_K
    # Fillers rank below every regularly kept one already; the sort keeps that invariant explicit.
    kept.sort(key=sort_key)
    return Selection(kept=kept, dropped=dropped, reasons=reasons)


def apply_selection(selection: Selection[Candidate]) -> None:
    """Write ``kept`` and ``reason`` onto the candidates of ``selection``."""
    for cand in selection.kept:
        cand.kept = True
        cand.reason = selection.reasons.get(cand.id)
    for cand in selection.dropped:
        cand.kept = False
        cand.reason = selection.reasons[cand.id]
