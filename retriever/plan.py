"""The one resolved set of retrieval options a request runs with: ``RetrievalPlan``.

The API's request models (``server/api_models.py::RetrievalKnobs`` and its children) carry what the
caller asked for, every field optional; ``server/services/planning.py::resolve_plan`` fills the gaps
from the settings once, and the retriever and the re-ranker take the resulting plan. Adding an option
means a field in ``RetrievalKnobs``, the same field here (with the setting that gives its default in
``DEFAULT_SETTINGS``), and its use.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

from retriever.scorers import SCORERS as SCORER_REGISTRY
from retriever.types import SearchFilters


def _check_scorer(name: str) -> str:
    if name not in SCORER_REGISTRY:
        raise ValueError(f"unknown scorer {name!r}; one of {', '.join(SCORER_REGISTRY)}")
    return name


class _RegisteredScorer:
    """Pydantic marker: a str that must name a scorer in ``retriever/scorers.py::SCORERS``.

    Checked and listed (the JSON schema's ``enum``) against the registry when used, so a scorer
    registered later is accepted by every model without editing it.
    """

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(_check_scorer, core_schema.str_schema())

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler,
    ) -> JsonSchemaValue:
        return {"type": "string", "enum": list(SCORER_REGISTRY)}


Scorer = Annotated[str, _RegisteredScorer()]  # a registered scorer's name (vlm, clip, none…)
SCORERS: Mapping[str, object] = SCORER_REGISTRY  # the live registry (``name in SCORERS``, ``list(SCORERS)``)
QueryMode = Literal["last", "recent", "rewrite"]  # what of a conversation is searched
RetrievalMode = Literal["hybrid", "dense", "lexical"]  # BM25 + CLIP fused, CLIP only, BM25 only
Fusion = Literal["evidence", "rrf", "weighted_rrf", "dbsf", "dbsf_best"]  # how the lists are fused (retriever/fusion.py::FUSIONS)
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
    fusion: Fusion = "evidence"
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
    "fusion": "retrieval_fusion",
    "query": "retrieval_query",
    "on_tool_result": "retrieval_on_tool_result",
    "verify": "retrieval_verify",
    "on_unsupported": "retrieval_on_unsupported",
}
