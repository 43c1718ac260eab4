"""vlmrag's own request/response models: /v1/ask, /v1/search, /v1/snippets, sources, timings.

Shape only; the caps that depend on settings (k, pool, images…) are checked in the services,
so one schema serves every deployment.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Scorer = Literal["vlm", "clip", "none"]


class RetrievalFilters(BaseModel):
    """Metadata filters; every given field must match (tags/kind: any of the listed values)."""

    model_config = ConfigDict(extra="forbid")

    source: str | None = Field(None, max_length=1024)
    tags: list[str] | None = Field(None, max_length=64)
    kind: list[Literal["image", "text", "image_text", "page"]] | None = None


class RetrievalOptions(BaseModel):
    """Per-request retrieval/selection overrides (the ``retrieval`` extension field)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    k: int | None = Field(None, ge=1, description="Keep at most k snippets.")
    threshold: float | None = Field(None, ge=0, le=1, description="Minimum relevancy to keep.")
    margin: float | None = Field(None, ge=0, le=1, description="Keep only within margin of the best.")
    min_k: int | None = Field(None, ge=0)
    pool: int | None = Field(None, ge=1, description="Candidates fetched from CLIP search.")
    scorer: Scorer | None = None
    filters: RetrievalFilters | None = None


class SourceItem(BaseModel):
    """One candidate snippet behind an answer; ``index`` is the ``[n]`` it is cited as (kept only)."""

    id: str
    index: int | None = None
    kind: str
    text: str = ""
    source: str = ""
    page: int | None = None
    image_url: str | None = None
    thumbnail_url: str | None = None
    clip_score: float
    relevancy: float | None = None
    kept: bool = False
    reason: str | None = None


class AskResponse(BaseModel):
    answer: str
    model: str
    sources: list[SourceItem] = Field(default_factory=list)
    timings: dict[str, float] = Field(default_factory=dict)
    usage: dict[str, int] | None = None
    degraded: list[str] = Field(default_factory=list)
    finish_reason: str | None = None


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str | None = None
    image: str | None = Field(
        None, description="A data: URL; an http(s) URL is fetched by the server only when it runs with "
        "VLMRAG_REMOTE_IMAGES_ENABLED=true (and the host is allowed), else refused with code remote_image_refused.",
    )
    k: int | None = Field(None, ge=1)
    threshold: float | None = Field(None, ge=0, le=1)
    margin: float | None = Field(None, ge=0, le=1)
    min_k: int | None = Field(None, ge=0, description="Keep at least this many (capped at k) when any pass.")
    pool: int | None = Field(None, ge=1)
    reranker: Scorer | None = Field(None, description="The relevancy scorer; `scorer` is accepted as well.")
    scorer: Scorer | None = Field(None, description="Same as `reranker` (the name chat and ask use).")
    filters: RetrievalFilters | None = None

    @model_validator(mode="after")
    def _one_scorer(self) -> SearchRequest:
        if self.scorer is not None and self.reranker is not None and self.scorer != self.reranker:
            raise ValueError("`scorer` and `reranker` name the same option; give one of them")
        return self

    @property
    def effective_scorer(self) -> Scorer | None:
        """``scorer`` or its older name ``reranker``."""
        return self.scorer or self.reranker


class SearchCandidate(BaseModel):
    id: str
    rank: int
    kind: str
    source: str = ""
    text: str = ""
    page: int | None = None
    tags: list[str] = Field(default_factory=list)
    clip_score: float
    vector_scores: dict[str, float] = Field(default_factory=dict)
    relevancy: float | None = None
    kept: bool = False
    reason: str | None = None
    image_url: str | None = None
    thumbnail_url: str | None = None


class SearchResponse(BaseModel):
    candidates: list[SearchCandidate]
    scorer: str
    degraded: list[str] = Field(default_factory=list)
    timings: dict[str, float] = Field(default_factory=dict)


class SnippetInfo(BaseModel):
    id: str
    kind: str
    text: str = ""
    source: str = ""
    tags: list[str] = Field(default_factory=list)
    page: int | None = None
    created_at: str = ""
    image_url: str | None = None
    thumbnail_url: str | None = None


class SnippetCreated(BaseModel):
    id: str
    created: bool = Field(description="False when identical content was already stored.")
    snippet: SnippetInfo | None = None


class SnippetList(BaseModel):
    items: list[SnippetInfo]
    next_offset: str | None = None


class DeleteResponse(BaseModel):
    id: str
    deleted: bool


class StatsResponse(BaseModel):
    model_config = ConfigDict(extra="allow")

    stats: dict[str, Any] = Field(default_factory=dict)


class HealthResponse(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, Any] = Field(default_factory=dict)
