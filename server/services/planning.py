"""Request options → ``RetrievalPlan``, once per request: the caller's values over the settings' defaults."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from retriever.plan import DEFAULT_SETTINGS, RetrievalPlan
from retriever.types import SearchFilters
from server.api_models import RetrievalFilters, RetrievalOptions
from server.limits import check_retrieval_caps
from server.settings import Settings


def resolve_plan(
    settings: Settings, options: RetrievalOptions | None, *, param_prefix: str = "retrieval.",
    defaults: Mapping[str, Any] | None = None,
) -> RetrievalPlan:
    """Resolve per-request options over a KB's ``defaults`` over ``settings``, enforcing the k/pool caps."""
    o = options or RetrievalOptions()
    check_retrieval_caps(settings, k=o.k, pool=o.pool, param_prefix=param_prefix)
    values: dict[str, Any] = {}
    for f in fields(RetrievalPlan):
        given = getattr(o, f.name, None)
        if given is None and defaults:
            given = defaults.get(f.name)
        if given is None and f.name in DEFAULT_SETTINGS:
            given = getattr(settings, DEFAULT_SETTINGS[f.name])
        if given is not None:
            values[f.name] = given
    values["filters"] = search_filters(o.filters)
    plan = RetrievalPlan(**values)
    plan.pool = max(plan.pool, plan.k)  # never fewer candidates than we may keep
    plan.min_k = min(plan.min_k, plan.k)
    check_retrieval_caps(settings, pool=plan.pool, param_prefix=param_prefix)
    return plan


def search_filters(filters: RetrievalFilters | None) -> SearchFilters | None:
    """The store's filter object; None when nothing is filtered."""
    if filters is None:
        return None
    result = SearchFilters(source=filters.source, tags=filters.tags, kind=list(filters.kind) if filters.kind else None)
    return None if result.is_empty() else result
