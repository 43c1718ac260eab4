"""What the lifespan builds once and keeps on ``app.state.vlmrag``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from retriever.rerank import RerankService
from server.metrics import Metrics
from server.services.chat import ChatService
from server.settings import Settings
from server.vllm_client import VLLMClient


@dataclass(slots=True)
class AppState:
    """Clients and services of one running app."""

    settings: Settings
    metrics: Metrics
    http: httpx.AsyncClient
    knowledge_base: Any  # retriever.knowledge_base.KnowledgeBase (or a test double with its methods)
    generator: VLLMClient
    rerank_backend: Any  # the re-ranker's VLLMClient (the generator itself when they coincide)
    reranker: RerankService
    chat: ChatService
    gate: Any  # server.ratelimit.ModelCallGate
