"""Retrieval-selection metrics: pure functions over per-query records (no I/O, no models).

Definitions (documented in results.md too):

* Per query q: ``relevant(q)`` = the ids that are correct (for COCO captions: the caption's own
  image, one id), ``kept(q)`` = what a method selects from the CLIP pool.
* precision = sum_q |kept ∩ relevant| / sum_q |kept|   (micro-averaged; ``None`` if nothing kept)
* recall    = sum_q |kept ∩ relevant| / sum_q |relevant|   (relevant items outside the pool count:
  a method cannot recover what CLIP did not retrieve; ``pool_recall`` is that ceiling)
* F1 = 2PR / (P + R), 0 when P is undefined or P + R = 0
* hit rate = share of queries with at least one relevant item kept. With exactly one relevant item
  per query (COCO), recall == hit rate.
* mean kept = sum_q |kept| / #queries; empty rate = share of queries where nothing is kept.
* latency p50/p95 (ms) per query: CLIP methods pay retrieval only; re-ranking methods pay
  retrieval + scoring (selection itself is microseconds).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from retriever.selection import select_adaptive

FAMILY_TOPK = "clip_topk"
FAMILY_CLIP_THRESHOLD = "clip_threshold"
FAMILY_RERANK = "rerank"


@dataclass(frozen=True, slots=True)
class ScoredItem:
    """One pool candidate of a query: CLIP fused score, its clip relevancy map, re-ranker score."""

    id: str
    clip_score: float
    clip_relevancy: float
    relevancy: float | None = None  # from the re-ranker (vlm, or clip when it degraded)


@dataclass(slots=True)
class QueryRecord:
    """What one query retrieved (CLIP order, best first) and how long each stage took."""

    query_id: str
    relevant: frozenset[str]
    candidates: list[ScoredItem]
    retrieval_ms: float = 0.0
    rerank_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class Method:
    """A selection method: CLIP top-k, CLIP map ≥ threshold (up to k), or re-ranker ≥ threshold (up to k)."""

    name: str
    family: str
    k: int
    threshold: float | None = None
    margin: float | None = None


@dataclass(slots=True)
class MethodResult:
    """Micro-averaged metrics of one method over the evaluated queries."""

    name: str
    family: str
    k: int
    threshold: float | None
    queries: int
    true_positives: int
    kept_total: int
    relevant_total: int
    precision: float | None
    recall: float
    f1: float
    hit_rate: float
    mean_kept: float
    empty_rate: float
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class _Scored:
    id: str
    relevancy: float | None
    clip_score: float


def standard_methods(
    k: int, thresholds: Sequence[float], clip_thresholds: Sequence[float], *, margin: float | None = None,
    topk: Sequence[int] = (1, 3, 5),
) -> list[Method]:
    """CLIP top-k for each ``topk``, CLIP map at each clip threshold, re-ranker at each threshold."""
    methods = [Method(f"clip top-{n}", FAMILY_TOPK, n) for n in topk]
    methods += [Method(f"clip ≥{t:.3f} (≤{k})", FAMILY_CLIP_THRESHOLD, k, t) for t in clip_thresholds]
    methods += [Method(f"rerank ≥{t:.2f} (≤{k})", FAMILY_RERANK, k, t, margin) for t in thresholds]
    return methods


def select_ids(record: QueryRecord, method: Method) -> list[str]:
    """The ids ``method`` keeps for ``record`` (best first)."""
    if method.family == FAMILY_TOPK:
        return [c.id for c in record.candidates[: method.k]]
    if method.family == FAMILY_CLIP_THRESHOLD:
        items = [_Scored(c.id, c.clip_relevancy, c.clip_score) for c in record.candidates]
    elif method.family == FAMILY_RERANK:
        items = [_Scored(c.id, c.relevancy, c.clip_score) for c in record.candidates]
    else:
        raise ValueError(f"unknown method family {method.family!r}")
    assert method.threshold is not None
    selection = select_adaptive(items, k=method.k, threshold=method.threshold, margin=method.margin)
    return [c.id for c in selection.kept]


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default); None for no values."""
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else None


def evaluate_method(records: Sequence[QueryRecord], method: Method) -> MethodResult:
    """Precision/recall/F1/hit rate/mean kept/latency of one method over ``records``."""
    tp = kept_total = relevant_total = hits = empty = 0
    latencies: list[float] = []
    for record in records:
        kept = select_ids(record, method)
        found = len(set(kept) & record.relevant)
        tp += found
        kept_total += len(kept)
        relevant_total += len(record.relevant)
        hits += found > 0
        empty += not kept
        latency = record.retrieval_ms + (record.rerank_ms if method.family == FAMILY_RERANK else 0.0)
        latencies.append(latency)
    n = len(records)
    precision = tp / kept_total if kept_total else None
    recall = tp / relevant_total if relevant_total else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision and (precision + recall) > 0 else 0.0
    return MethodResult(
        name=method.name, family=method.family, k=method.k, threshold=method.threshold, queries=n,
        true_positives=tp, kept_total=kept_total, relevant_total=relevant_total, precision=precision,
        recall=recall, f1=f1, hit_rate=hits / n if n else 0.0, mean_kept=kept_total / n if n else 0.0,
        empty_rate=empty / n if n else 0.0, latency_p50_ms=percentile(latencies, 50),
        latency_p95_ms=percentile(latencies, 95),
    )


def evaluate(records: Sequence[QueryRecord], methods: Sequence[Method]) -> list[MethodResult]:
    """Every method's result, in the order given."""
    return [evaluate_method(records, m) for m in methods]


def pool_recall(records: Sequence[QueryRecord]) -> float:
    """Share of relevant items that are anywhere in the CLIP pool: the ceiling of every method's recall."""
    relevant = sum(len(r.relevant) for r in records)
    found = sum(len(r.relevant & {c.id for c in r.candidates}) for r in records)
    return found / relevant if relevant else 0.0


def recall_at(records: Sequence[QueryRecord], n: int) -> float:
    """CLIP's classic R@n: share of queries with a relevant item in the first n (COCO: == top-n recall)."""
    if not records:
        return 0.0
    return sum(bool(r.relevant & {c.id for c in r.candidates[:n]}) for r in records) / len(records)


def auto_clip_thresholds(records: Sequence[QueryRecord], count: int = 9) -> list[float]:
    """``count`` thresholds evenly spaced between the 5th and 95th percentile of the pool's clip map.

    The clip map's useful range depends on the CLIP model (ViT-B-32 text→image: ~0.6–0.68), so a
    fixed grid would waste most points; this one is derived from the data, hence reproducible.
    """
    values = [c.clip_relevancy for r in records for c in r.candidates if math.isfinite(c.clip_relevancy)]
    if not values:
        return []
    lo, hi = percentile(values, 5), percentile(values, 95)
    assert lo is not None and hi is not None
    if count <= 1 or hi - lo < 1e-9:
        return [round(lo, 4)]
    return [round(lo + (hi - lo) * i / (count - 1), 4) for i in range(count)]
