"""The one resolved set of retrieval options a request runs with: ``RetrievalPlan``.

The API's request models (``server/api_models.py::RetrievalKnobs`` and its children) carry what the
caller asked for, every field optional; ``server/services/planning.py::resolve_plan`` fills the gaps
from the settings once, and the retriever and the re-ranker take the resulting plan. Adding an option
means a field in ``RetrievalKnobs``, the same field here (with the setting that gives its default in
``DEFAULT_SETTINGS``), and its use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from retriever.types import SearchFilters

Scorer = Literal["vlm", "clip", "none"]
SCORERS: tuple[str, ...] = get_args(Scorer)
QueryMode = Literal["last", "recent", "rewrite"]  # what of a conversation is searched
RetrievalMode = Literal["hybrid", "dense", "lexical"]  # BM25 + CLIP fused, CLIP only, BM25 only
OnToolResult = Literal["skip", "search"]  # a turn ending in a tool result: no new search, or search anyway
VerifyMode = Literal["off", "lexical", "model"]  # the answer check (retriever/verify.py, retriever/verify_model.py)
OnUnsupported = Literal["flag", "disclaim"]  # an unsupported claim: flagged in `verification`, or a sentence added


@dataclass(slots=True)
class RetrievalPlan:
    """Retrieval, re-rank and selection parameters of one request (request overrides over settings)."""

    k: int = 5
    threshold: float = 0.5
    margin: float | None = None
    min_k: int = 0
    pool: int = 20
    scorer: Scorer = "vlm"
    mode: RetrievalMode = "hybrid"
    exact: bool = False  # exact vector search (the escape hatch from HNSW)
    filters: SearchFilters | None = None
    enabled: bool = True
    query: QueryMode = "recent"
    on_tool_result: OnToolResult = "skip"
    verify: VerifyMode = "lexical"
    on_unsupported: OnUnsupported = "flag"


# Plan field -> the Settings field that gives its default when the request leaves it out.
DEFAULT_SETTINGS: dict[str, str] = {
    "k": "retrieval_k",
    "threshold": "retrieval_threshold",
    "margin": "retrieval_margin",
    "min_k": "retrieval_min_k",
    "pool": "retrieval_pool",
    "scorer": "rerank_scorer",
    "mode": "retrieval_mode",
    "query": "retrieval_query",
    "on_tool_result": "retrieval_on_tool_result",
    "verify": "retrieval_verify",
    "on_unsupported": "retrieval_on_unsupported",
}
