"""What the lifespan builds once and keeps on ``app.state.vlmrag``."""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from retriever.knowledge_base import KnowledgeBase
from retriever.rerank import ChatBackend, RerankService
from server.auth import AccessControl
from server.feedback import AnswerLog
from server.gate import ModelCallGate
from server.knowledge_bases import KnowledgeBases
from server.metrics import Metrics
from server.ranker_client import RankerClient
from server.services.backups import BackupSchedule, BackupService
from server.services.chat import ChatService
from server.services.hnsw_builds import HnswBuilds
from server.services.ingestion import IngestionService
from server.services.verification import Verifier
from server.settings import Settings
from server.vllm_client import VLLMClient


@dataclass(slots=True)
class AppState:
    """Clients and services of one running app."""

    settings: Settings
    metrics: Metrics
    http: httpx.AsyncClient
    knowledge_base: KnowledgeBase  # the default KB
    knowledge_bases: KnowledgeBases  # every KB (the default one included), opened on first use
    answer_client: VLLMClient  # the answering model
    rerank_backend: ChatBackend  # the re-ranker's model: answer_client itself when they coincide
    ranker: RankerClient | None  # the ``rerank`` scorer's cross-encoder (VLMRAG_RANKER_URL); None when not set
    reranker: RerankService
    chat: ChatService
    gate: ModelCallGate  # the one ChatService holds too
    access: AccessControl  # API keys and rate limiters, read by server/auth.py's dependencies
    answer_log: AnswerLog  # every answer's record and its feedback (server/feedback.py)
    hnsw_builds: HnswBuilds  # HNSW builds of embedded stores beside the server (server/services/hnsw_builds.py)
    ingestion: IngestionService  # uploaded files and single snippets (server/services/ingestion.py)
    verifier: Verifier  # answers checked against their sources (server/services/verification.py), ChatService's
    backups: BackupService  # archives of the KBs (server/services/backups.py): POST /v1/admin/backup, the schedule
    backup_schedule: BackupSchedule | None = None  # VLMRAG_BACKUP_INTERVAL_S > 0 with VLMRAG_BACKUP_DIR set
