"""vlmrag's own request/response models: /v1/ask, /v1/search, /v1/snippets, sources, timings.

Shape only; the caps that depend on settings (k, pool, images…) are checked in the services,
so one schema serves every deployment.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from retriever.plan import Fusion, OnToolResult, OnUnsupported, QueryMode, RetrievalMode, Scorer, VerifyMode


class RetrievalFilters(BaseModel):
    """Metadata filters; every given field must match (tags/kind: any of the listed values)."""

    model_config = ConfigDict(extra="forbid")

    source: str | None = Field(None, max_length=1024)
    tags: list[str] | None = Field(None, max_length=64)
    kind: list[Literal["image", "text", "image_text", "page"]] | None = None


class RetrievalKnobs(BaseModel):
    """The retrieval and selection options every entry point shares; unset fields take the settings'.

    Chat sends them as its ``retrieval`` object, ``/v1/search`` at the top level and ``/v1/ask`` as form
    fields; ``server/services/planning.py::resolve_plan`` turns them into one ``RetrievalPlan``.
    """

    model_config = ConfigDict(extra="forbid")

    k: int | None = Field(None, ge=1, description="Keep at most k snippets.")
    threshold: float | None = Field(None, ge=0, le=1, description="Minimum relevancy to keep.")
    margin: float | None = Field(None, ge=0, le=1, description="Keep only within margin of the best.")
    min_k: int | None = Field(None, ge=0, description="Keep at least this many (capped at k) when any pass.")
    pool: int | None = Field(None, ge=1, description="Candidates fetched from CLIP search.")
    scorer: Scorer | None = Field(None, description="The relevancy scorer.")
    mode: RetrievalMode | None = Field(
        None, description="`hybrid`: BM25 and CLIP lists fused (default); `dense`: CLIP only; `lexical`: BM25 only.",
    )
    exact: bool | None = Field(None, description="Exact vector search, no HNSW (slower on large stores; default off).")
    fusion: Fusion | None = Field(
        None, description="How the ranked lists are fused: `evidence` (default: every list's hits ordered by their "
        "evidence relevancy: identifiers held, words covered, cosine standout), `rrf` (best-field reciprocal rank), "
        "`weighted_rrf` (each list weighted by how far its best stands out), `dbsf` / `dbsf_best` (Qdrant's "
        "distribution-based score fusion).",
    )


class RetrievalOptions(RetrievalKnobs):
    """Per-request retrieval/selection overrides (the ``retrieval`` extension field of chat)."""

    enabled: bool = True
    filters: RetrievalFilters | None = None
    query: QueryMode | None = Field(
        None, description="What of the conversation is searched: `last` user turn, `recent` user turns "
        "(newest first, within a budget), or `rewrite` (the model writes a stand-alone query).",
    )
    on_tool_result: OnToolResult | None = Field(
        None, description="When the last message is a tool result: `skip` searching (default) or `search`.",
    )
    kb: str | None = Field(None, max_length=48, description="Knowledge base; also chosen by model `vlmrag/<kb>`.")
    verify: VerifyMode | None = Field(
        None, description="Check each answer sentence against the kept snippets: `off`, `lexical` (default: "
        "identifiers, numbers with units and quotes must occur in a cited snippet) or `model` (the relevancy "
        "model also judges each sentence).",
    )
    on_unsupported: OnUnsupported | None = Field(
        None, description="When a sentence is unsupported: `flag` it in `verification` (default) or also "
        "`disclaim` (a configured sentence is appended to the answer).",
    )


class SearchRequest(RetrievalKnobs):
    text: str | None = None
    image: str | None = Field(
        None, description="A data: URL; an http(s) URL is fetched by the server only when it runs with "
        "VLMRAG_REMOTE_IMAGES_ENABLED=true (and the host is allowed), else refused with code remote_image_refused.",
    )
    reranker: Scorer | None = Field(
        None, deprecated=True, description="Deprecated alias of `scorer` (the name chat and ask use); still honoured.",
    )
    filters: RetrievalFilters | None = None

    @model_validator(mode="after")
    def _one_scorer(self) -> SearchRequest:
        if self.scorer is not None and self.reranker is not None and self.scorer != self.reranker:
            raise ValueError("`scorer` and `reranker` name the same option; give one of them")
        if self.scorer is None and self.reranker is not None:
            self.scorer = self.reranker
        return self

    def retrieval_options(self) -> RetrievalOptions:
        """The shared options of this search (``reranker`` already folded into ``scorer``)."""
        return RetrievalOptions(**_knobs(self), filters=self.filters)


class AskForm(RetrievalKnobs):
    """The text fields of the ``/v1/ask`` multipart form (the image files come as ``image`` parts)."""

    model_config = ConfigDict(extra="ignore")  # the file parts share the form

    question: str = Field("", description="The question.")
    kb: str | None = Field(None, max_length=48, description="Knowledge base (default: the key's first).")
    source: str | None = Field(None, max_length=1024, description="Only snippets from this source.")
    tags: list[str] | None = Field(None, description="Only snippets with any of these tags.")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    stream: bool = False
    verify: VerifyMode | None = Field(None, description="As chat's `retrieval.verify`.")
    on_unsupported: OnUnsupported | None = Field(None, description="As chat's `retrieval.on_unsupported`.")

    def retrieval_options(self) -> RetrievalOptions:
        filters = RetrievalFilters(source=self.source, tags=self.tags) if (self.source or self.tags) else None
        return RetrievalOptions(**_knobs(self), filters=filters, verify=self.verify,
                                on_unsupported=self.on_unsupported)


def _knobs(model: RetrievalKnobs) -> dict[str, Any]:
    return {name: getattr(model, name) for name in RetrievalKnobs.model_fields}


class KnowledgeBaseCreate(BaseModel):
    """``POST /v1/knowledge-bases``: a new knowledge base."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,47}$", description="Its id: in model ids, ?kb= and keys.")
    display_name: str = Field("", max_length=200)
    description: str = Field("", max_length=2000)
    system_prompt: str = Field("", max_length=4000, description="Added to the system prompt of its answers.")
    retrieval: RetrievalKnobs = Field(default_factory=RetrievalKnobs, description="Its retrieval defaults.")


class KnowledgeBaseUpdate(BaseModel):
    """``PATCH /v1/knowledge-bases/{name}``: the fields given replace the stored ones."""

    model_config = ConfigDict(extra="forbid")

    display_name: str | None = Field(None, max_length=200)
    description: str | None = Field(None, max_length=2000)
    system_prompt: str | None = Field(None, max_length=4000)
    retrieval: RetrievalKnobs | None = None


class KnowledgeBaseInfo(BaseModel):
    name: str
    display_name: str = ""
    description: str = ""
    system_prompt: str = ""
    retrieval: dict[str, Any] = Field(default_factory=dict)
    created_at: float = 0.0
    model: str = Field(description="The model id that picks it in chat completions.")
    count: int | None = Field(None, description="Snippets in it (on GET of one KB).")


class KnowledgeBaseList(BaseModel):
    items: list[KnowledgeBaseInfo]


class KnowledgeBaseDeleted(BaseModel):
    name: str
    deleted: bool
    snippets: int


class OptimizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    force: bool = Field(False, description="Build even below VLMRAG_HNSW_MIN_POINTS points.")


class IndexInfo(BaseModel):
    points: int
    segments: int
    indexed_vectors: int = Field(description="HNSW-indexed vectors, summed over the dense vectors.")


class HnswBuildInfo(BaseModel):
    """The last HNSW build of a KB's embedded store (``state`` ``idle``: none since the server started)."""

    kb: str
    state: Literal["idle", "running", "done", "failed", "not_needed"]
    trigger: Literal["api", "auto"] | None = None
    started_at: float | None = None
    finished_at: float | None = None
    points: int = 0
    reason: str = ""
    result: dict[str, Any] = Field(default_factory=dict, description="points, segments, indexed_vectors, "
                                   "seconds, build_seconds, replayed_writes, shard (once done)")
    index: IndexInfo | None = Field(None, description="The store now (embedded store only).")


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


class CheckedToken(BaseModel):
    """One checkable token of a claim: an identifier, a number with its unit, a quoted string or a citation."""

    text: str = Field(description="As written in the answer.")
    kind: Literal["identifier", "quantity", "quote", "citation"]
    start: int = Field(description="Offset in the answer (Unicode code points).")
    end: int
    supported: bool | None = Field(description="Whether a snippet the claim may rely on contains it.")


class Claim(BaseModel):
    """One sentence (or list item) of an answer and whether its sources support it."""

    text: str
    start: int = Field(description="Offset of the sentence in the answer (Unicode code points).")
    end: int
    cites: list[int] = Field(default_factory=list, description="The [n] it cites.")
    supported: bool | None = Field(description="false: unsupported; null: nothing checkable (lexical) or the "
                                   "model check failed.")
    unsupported: list[str] = Field(default_factory=list, description="Tokens no snippet it may rely on contains.")
    score: float | None = Field(None, description="lexical: share of its tokens found; model: P(supported).")
    checked: list[CheckedToken] = Field(default_factory=list, description="Every token checked, with offsets.")


class Verification(BaseModel):
    """The check of an answer against its sources (``retrieval.verify``)."""

    mode: Literal["lexical", "model"]
    claims: list[Claim]
    supported_ratio: float | None = Field(description="Supported share of the judged claims; null when none was.")
    disclaimed: bool = Field(False, description="The answer got the configured disclaimer appended.")


class VerifyRequest(BaseModel):
    """``POST /v1/verify``: check an answer made elsewhere against snippets, or a logged answer again."""

    model_config = ConfigDict(extra="forbid")

    answer: str | None = Field(None, description="The answer text; default with `completion_id`: the logged one.")
    snippet_ids: list[Annotated[str, Field(max_length=100)]] | None = Field(
        None, description="The sources, in citation order: `[1]` is the first id (at most VLMRAG_LIMIT_K).",
    )
    completion_id: str | None = Field(None, min_length=1, max_length=100,
                                      description="A logged answer of this key: its kept snippets are the sources.")
    kb: str | None = Field(None, max_length=48, description="The snippets' knowledge base (default: the key's first).")
    verify: Literal["lexical", "model"] | None = Field(None, description="The check (default: the server's, "
                                                       "lexical when that is off).")

    @model_validator(mode="after")
    def _one_source(self) -> VerifyRequest:
        if (self.snippet_ids is None) == (self.completion_id is None):
            raise ValueError("give either `snippet_ids` or `completion_id`")
        if self.snippet_ids is not None and self.answer is None:
            raise ValueError("`answer` is required with `snippet_ids`")
        return self


class VerifyResponse(Verification):
    degraded: list[str] = Field(default_factory=list, description="`verify`: the model check failed or timed out.")
    timings: dict[str, float] = Field(default_factory=dict)


class AskResponse(BaseModel):
    answer: str
    model: str
    id: str = Field("", description="The completion id: rate the answer with POST /v1/feedback.")
    sources: list[SourceItem] = Field(default_factory=list)
    timings: dict[str, float] = Field(default_factory=dict)
    usage: dict[str, int] | None = None
    degraded: list[str] = Field(default_factory=list)
    finish_reason: str | None = None
    verification: Verification | None = None


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


class ScorerInfo(BaseModel):
    name: str
    description: str
    threshold: bool = Field(description="Whether the relevancy threshold applies (false: the top k in retrieval order).")
    available: bool = Field(True, description="False while a setting it needs is empty (rerank: VLMRAG_RANKER_URL); "
                            "a request naming it then degrades to the evidence scorer, degraded [\"rerank\"].")


class ScorerList(BaseModel):
    """The registered relevancy scorers (``retrieval.scorer`` / ``scorer`` values) and the server's default."""

    scorers: list[ScorerInfo]
    default: str


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
    """GET /v1/stats: what the knowledge base holds and which backends hold it."""

    count: int
    by_kind: dict[str, int]
    by_source: dict[str, int] = Field(description="Snippets per source, most first.")
    embedder: str | None = Field(description="The CLIP identity the collection was built with.")
    store: str
    collection: str
    blobs: str
    lexical: bool = Field(True, description="False: the collection predates BM25 (dense only; vlmrag backfill-lexical).")
    passage: dict[str, Any] | None = Field(
        None, description="The text embedder of the `passage` vector ({embedder, dim}); null: the collection has "
                          "none (CLIP text and BM25 only; vlmrag backfill-passage).")
    text_embedder: str | None = Field(None, description="The configured text embedder's identity; null: none.")


ReadinessChecks = dict[str, str | dict[str, str]]  # "store": "ok" | reason; "vllm": {replica url: "ok" | reason}


class HealthResponse(BaseModel):
    """GET /healthz (``status`` only) and GET /readyz (with its ``checks``)."""

    status: Literal["ok", "unavailable"]
    checks: ReadinessChecks | None = None


class FileFailure(BaseModel):
    key: str = Field(description="Which part of the file: the file, a page or a passage.")
    reason: str
    status: int | None = Field(None, description="The HTTP status this failure maps to (413, 415, 422…).")


class FileReport(BaseModel):
    filename: str = Field(description="The uploaded file's name, as stored in the snippets' source.")
    ingested: int = 0
    existing: int = Field(0, description="Snippets already present (identical content and source).")
    failed: int = 0
    failures: list[FileFailure] = Field(default_factory=list)
    ids: list[str] = Field(default_factory=list, description="Ids of the snippets created now.")


class IngestFilesResponse(BaseModel):
    """POST /v1/ingest/files: one report per uploaded file."""

    files: list[FileReport]


class FeedbackRequest(BaseModel):
    """``POST /v1/feedback``: a rating of an answer this key received (rating again replaces it)."""

    model_config = ConfigDict(extra="forbid")

    completion_id: str = Field(min_length=1, max_length=100, description="The `id` of the chat completion or ask.")
    rating: Literal["up", "down"]
    comment: str | None = Field(None, description="Free text (at most VLMRAG_LIMIT_FEEDBACK_COMMENT_CHARS).")
    snippet_ids: list[Annotated[str, Field(max_length=100)]] | None = Field(
        None, max_length=64, description="The answer's sources the rating is about (e.g. a wrong one).",
    )


class AnswerSource(BaseModel):
    """A candidate behind a logged answer, with its scores; ``index`` is its citation number when kept."""

    id: str
    index: int | None = None
    kind: str | None = None
    source: str | None = None
    page: int | None = None
    clip_score: float | None = None
    relevancy: float | None = None
    kept: bool = False


class AnswerInfo(BaseModel):
    """The logged answer a rating is about: enough to replay it."""

    completion_id: str
    kb: str
    question: str
    answer: str = ""
    search_query: str | None = None
    sources: list[AnswerSource] = Field(default_factory=list)
    model: str
    settings: dict[str, Any] = Field(default_factory=dict, description="The resolved retrieval plan and more.")
    created_at: float
    verification: dict[str, Any] | None = Field(None, description="The answer's check, as it went out.")


class FeedbackItem(BaseModel):
    completion_id: str
    kb: str
    key_id: str = Field(description="The key that received the answer and rated it (a hash prefix).")
    rating: Literal["up", "down"]
    comment: str | None = None
    snippet_ids: list[str] = Field(default_factory=list)
    rated_at: float
    answer: AnswerInfo


class FeedbackList(BaseModel):
    """``GET /v1/feedback``: newest ratings first; pass ``next_cursor`` as ``cursor`` for the next page."""

    items: list[FeedbackItem]
    next_cursor: str | None = None


class BackupRequest(BaseModel):
    """POST /v1/admin/backup: every KB or one, full or incremental over an archive of the backup folder."""

    model_config = ConfigDict(extra="forbid")

    kb: str | None = Field(None, max_length=48, description="Only this knowledge base.")
    incremental: str | None = Field(None, max_length=200, description="Name of an archive in VLMRAG_BACKUP_DIR: "
                                    "its blobs are left out.")
    format: Literal["auto", "logical"] = Field("auto", description="auto: the embedded store as its shard's files "
                                               "(fast), a Qdrant server's points; logical: every KB as its points.")


class BackupInfo(BaseModel):
    """One archive: what its manifest says (``error``: an archive that cannot be read)."""

    name: str
    path: str
    bytes: int | None = None
    created_at: float | None = None
    kind: str | None = None
    base: str | None = None
    vlmrag_version: str | None = None
    format_version: int | None = None
    embedders: list[dict[str, Any]] = Field(default_factory=list)
    database: dict[str, int] = Field(default_factory=dict, description="rows per table")
    kbs: dict[str, dict[str, Any]] = Field(default_factory=dict, description="points, blobs, blobs_in_base, "
                                           "embedder_id per KB")
    error: str | None = None


class BackupList(BaseModel):
    items: list[BackupInfo]
    schedule: dict[str, Any] | None = Field(None, description="interval_s, keep, last, last_error (when scheduled)")
