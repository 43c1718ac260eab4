"""Fusion of the ranked lists of one search into one candidate pool: pure functions, one per method.

Lists are named ``"<query part>-><vector>"`` (``text->image``, ``image->lexical``…); each holds
``ScoredPoint``s best first. Every method returns ``Candidate``s best first with ``clip_score`` in
(0, 1] (1.0: first in a list for every query part) and each list's raw score in ``vector_scores``.

* ``rrf`` — best-field reciprocal rank fusion (the default before this module; see
  ``retriever/search.py``): per query part a snippet scores its best ``1 / (rrf_k + rank)`` over the
  part's lists, the parts are summed. Ranks only, so a flat list (random weights; every display
  photo looks alike to CLIP) weighs as much as an exact BM25 match.
* ``weighted_rrf`` — the same, each list's reciprocal ranks times its **informativeness** in
  [``MIN_WEIGHT``, 1]: how far its best score stands out of the rest, in median absolute deviations
  (``list_weight``). A peaked list (an exact BM25 match at 4.6 among 0.2s; a near-identical image)
  keeps weight 1; a flat one drops to ``MIN_WEIGHT``. Lists of fewer than ``MIN_LIST`` hits keep 1
  (BM25 returning one or two pages is informative by itself).
* ``dbsf`` — Qdrant's distribution-based score fusion: each list's scores normalised by its own
  mean ± 3 standard deviations, clipped to [0, 1], summed over every list.
* ``dbsf_best`` — DBSF's normalisation with best-field combination: per query part the best
  normalised score over its lists, the parts summed (a snippet's two vectors are two views of one
  document, as for ``rrf``).
* ``evidence`` (the default) — every hit of every list, ordered by its **evidence relevancy**
  (``retriever/evidence.py``: the query's identifiers held, its words covered, how far a cosine
  stands out of its list), ``weighted_rrf`` breaking ties; ``rank`` is that order, ``clip_score``
  the ``rrf`` score (selection breaks relevancy ties by it: consensus among lists). Rank
  fusions sum reciprocal ranks, and with k=60 rank 20 is worth 3/4 of rank 1: a snippet two flat
  lists return (a random CLIP list, a question's generic words) beats an exact BM25 match only one
  list has, and a photo question's exact page could fall out of the pool. Ordering by evidence puts
  the pool on the scale the threshold reads. Measured with ``bench_support.py`` (benchmarks/README.md).

``FUSIONS`` maps the names to the functions; ``retriever/plan.py::Fusion`` lists the same names.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

from retriever.evidence import evidence_relevancy
from retriever.store.base import LEXICAL_VECTOR
from retriever.types import Candidate, ScoredPoint, SnippetPayload

Lists = dict[str, list[ScoredPoint]]
FusionFn = Callable[..., list[Candidate]]  # (lists, rrf_k, limit, *, text="", image_text="") -> best first

MIN_LIST = 3  # a list shorter than this keeps weight 1
STANDOUT_FLAT = 3.0  # best - median in MADs at or below which a list is flat (a random list of 20: ~2.8)
STANDOUT_PEAKED = 8.0  # at or above which it has full weight
MIN_WEIGHT = 0.1


def _part(name: str) -> str:
    return name.split("->")[0]


def list_weight(scores: list[float]) -> float:
    """Informativeness of one list in [MIN_WEIGHT, 1] from how far its best stands out (see module)."""
    if len(scores) < MIN_LIST:
        return 1.0
    ordered = sorted(scores, reverse=True)
    median = statistics.median(ordered)
    mad = statistics.median(abs(s - median) for s in ordered)
    gap = ordered[0] - median
    if gap <= 0:
        return MIN_WEIGHT
    spread = max(mad, 1e-6 * max(abs(ordered[0]), 1.0))
    standout = gap / spread
    share = (standout - STANDOUT_FLAT) / (STANDOUT_PEAKED - STANDOUT_FLAT)
    return max(MIN_WEIGHT, min(1.0, MIN_WEIGHT + (1.0 - MIN_WEIGHT) * share))


def _candidates(lists: Lists, fused: dict[str, float], scale: float, limit: int) -> list[Candidate]:
    """Order by fused score, then by the best raw score (BM25 as a fraction of its list's best), then id."""
    payloads: dict[str, SnippetPayload] = {}
    scores: dict[str, dict[str, float]] = {}
    for name, hits in lists.items():
        for hit in hits:
            payloads.setdefault(hit.id, hit.payload)
            scores.setdefault(hit.id, {}).setdefault(name, hit.score)
    top_bm25 = {name: max((h.score for h in hits), default=0.0) for name, hits in lists.items()
                if name.endswith(LEXICAL_VECTOR)}

    def tie_break(pid: str) -> float:
        return max(v / top_bm25[n] if n in top_bm25 and top_bm25[n] > 0 else v for n, v in scores[pid].items())

    order = sorted(fused, key=lambda pid: (-fused[pid], -tie_break(pid), pid))
    return [
        Candidate(id=pid, payload=payloads[pid], clip_score=min(1.0, fused[pid] * scale),
                  vector_scores=scores[pid], rank=position)
        for position, pid in enumerate(order[:limit], start=1)
    ]


def _best_field_scores(lists: Lists, rrf_k: int, weights: dict[str, float]) -> dict[str, float]:
    """Per id: per query part its best weighted reciprocal rank, parts summed, scaled (1.0: first everywhere)."""
    best: dict[str, dict[str, float]] = {}  # id -> query part -> best weighted reciprocal rank
    for name, hits in lists.items():
        part, weight = _part(name), weights.get(name, 1.0)
        for rank, hit in enumerate(hits, start=1):
            parts = best.setdefault(hit.id, {})
            parts[part] = max(parts.get(part, 0.0), weight / (rrf_k + rank))
    scale = (rrf_k + 1) / max(1, len({_part(name) for name in lists}))
    return {pid: sum(parts.values()) * scale for pid, parts in best.items()}


def _list_weights(lists: Lists) -> dict[str, float]:
    return {name: list_weight([h.score for h in hits]) for name, hits in lists.items()}


def rrf(lists: Lists, rrf_k: int, limit: int, *, text: str = "", image_text: str = "") -> list[Candidate]:
    """Best-field RRF: per query part the best reciprocal rank over its lists, parts summed."""
    return _candidates(lists, _best_field_scores(lists, rrf_k, {}), 1.0, limit)


def weighted_rrf(lists: Lists, rrf_k: int, limit: int, *, text: str = "", image_text: str = "") -> list[Candidate]:
    """Best-field RRF with each list's reciprocal ranks times its informativeness (``list_weight``)."""
    return _candidates(lists, _best_field_scores(lists, rrf_k, _list_weights(lists)), 1.0, limit)


def _normalised(hits: list[ScoredPoint]) -> dict[str, float]:
    """Qdrant's DBSF normalisation of one list: (s - (mean - 3 sd)) / 6 sd, clipped to [0, 1]."""
    if not hits:
        return {}
    values = [h.score for h in hits]
    mean = statistics.fmean(values)
    sd = statistics.pstdev(values) if len(values) > 1 else 0.0
    return {h.id: 0.5 if sd <= 0 else min(1.0, max(0.0, (h.score - (mean - 3 * sd)) / (6 * sd))) for h in hits}


def dbsf(lists: Lists, rrf_k: int, limit: int, *, text: str = "", image_text: str = "") -> list[Candidate]:
    """Qdrant's distribution-based score fusion: every list normalised (``_normalised``), summed over lists."""
    fused: dict[str, float] = {}
    for hits in lists.values():
        for pid, norm in _normalised(hits).items():
            fused[pid] = fused.get(pid, 0.0) + norm
    n_lists = max(1, sum(1 for hits in lists.values() if hits))
    return _candidates(lists, fused, 1.0 / n_lists, limit)


def dbsf_best(lists: Lists, rrf_k: int, limit: int, *, text: str = "", image_text: str = "") -> list[Candidate]:
    """DBSF normalisation, best field: per query part the best normalised score over its lists, parts summed."""
    best: dict[str, dict[str, float]] = {}
    for name, hits in lists.items():
        part = _part(name)
        for pid, norm in _normalised(hits).items():
            parts = best.setdefault(pid, {})
            parts[part] = max(parts.get(part, 0.0), norm)
    fused = {pid: sum(parts.values()) for pid, parts in best.items()}
    n_parts = max(1, len({_part(name) for name, hits in lists.items() if hits}))
    return _candidates(lists, fused, 1.0 / n_parts, limit)


def evidence(lists: Lists, rrf_k: int, limit: int, *, text: str = "", image_text: str = "") -> list[Candidate]:
    """Every hit of ``lists`` by its evidence relevancy for the query ``text`` and the text OCR read from
    its images (``image_text``), ``weighted_rrf`` order breaking ties; the first ``limit``."""
    weighted = _best_field_scores(lists, rrf_k, _list_weights(lists))
    everything = _candidates(lists, weighted, 1.0, len(weighted))
    plain = _best_field_scores(lists, rrf_k, {})
    relevancy = evidence_relevancy(text, image_text, everything)
    ordered = sorted(everything, key=lambda c: (-relevancy[c.id], c.rank))[:limit]
    for position, cand in enumerate(ordered, start=1):
        # clip_score: the best-field RRF score (1.0: first in a list of every query part), the
        # selection's tie-break between equal relevancies (consensus among the lists)
        cand.rank, cand.clip_score = position, min(1.0, plain[cand.id])
    return ordered


FUSIONS: dict[str, FusionFn] = {"evidence": evidence, "rrf": rrf, "weighted_rrf": weighted_rrf, "dbsf": dbsf,
                                "dbsf_best": dbsf_best}


def fuse(lists: Lists, rrf_k: int, limit: int, method: str = "evidence", *, text: str = "",
         image_text: str = "") -> list[Candidate]:
    """The candidates of ``lists`` fused by ``method`` (one of ``FUSIONS``), best first. ``text`` /
    ``image_text``: the query's text and what OCR read from its images (the ``evidence`` order reads them)."""
    return FUSIONS[method](lists, rrf_k, limit, text=text, image_text=image_text)
