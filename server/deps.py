"""FastAPI dependency aliases (``XDep = Annotated[X, Depends(get_x)]``) over the app state.

``get_access_control`` lives in ``server/auth.py``: the auth dependencies need it, and importing this
module (the services, torch) from there would make ``vlmrag keygen`` slow.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query, Request

from retriever.knowledge_base import KnowledgeBase
from server.auth import AccessControl, Principal, get_access_control
from server.feedback import AnswerLog
from server.knowledge_bases import KnowledgeBases
from server.knowledge_bases.access import choose_kb
from server.metrics import Metrics
from server.services.backups import BackupService
from server.services.chat import ChatService
from server.services.hnsw_builds import HnswBuilds
from server.services.ingestion import IngestionService
from server.services.verification import Verifier
from server.settings import Settings
from server.state import AppState


def state_of(request: Request) -> AppState:
    """The services built by the lifespan."""
    return request.app.state.vlmrag


# The dependencies are ``async def``: FastAPI runs a plain ``def`` dependency in its thread pool, a
# thread hop per dependency (a dozen per request: ~1 ms of /v1/search's own time on two cores).
async def get_state(request: Request) -> AppState:
    return state_of(request)


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_chat_service(request: Request) -> ChatService:
    return state_of(request).chat


async def get_kb_name(
    request: Request,
    kb: Annotated[str | None, Query(max_length=48, description="Knowledge base (default: the key's first).")] = None,
) -> str:
    """The knowledge base named by ``?kb=`` (or the caller's default), which the caller must be bound to.

    The route's auth dependency runs first and leaves the caller on ``request.state.principal``.
    """
    return use_kb(request, choose_kb(getattr(request.state, "principal", None), kb))


def use_kb(request: Request, name: str) -> str:
    """Charge one request to KB ``name``'s own rate limit (all keys together); 429 when it is spent."""
    state_of(request).access.limiters.charge(f"kb:{name}", "kb")
    return name


async def get_knowledge_base(request: Request, name: Annotated[str, Depends(get_kb_name)]) -> KnowledgeBase:
    """The opened knowledge base of ``get_kb_name``."""
    return await state_of(request).knowledge_bases.get(name)


async def get_principal(request: Request) -> Principal | None:
    """The caller, as the route's auth dependency found it."""
    return getattr(request.state, "principal", None)


async def get_knowledge_bases(request: Request) -> KnowledgeBases:
    return state_of(request).knowledge_bases


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_answer_log(request: Request) -> AnswerLog:
    return state_of(request).answer_log


async def get_hnsw_builds(request: Request) -> HnswBuilds:
    return state_of(request).hnsw_builds


async def get_ingestion(request: Request) -> IngestionService:
    return state_of(request).ingestion
async def get_verifier(request: Request) -> Verifier:
    return state_of(request).verifier


async def get_backups(request: Request) -> BackupService:
    return state_of(request).backups


StateDep = Annotated[AppState, Depends(get_state)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
ChatServiceDep = Annotated[ChatService, Depends(get_chat_service)]
KnowledgeBaseDep = Annotated[KnowledgeBase, Depends(get_knowledge_base)]
KnowledgeBasesDep = Annotated[KnowledgeBases, Depends(get_knowledge_bases)]
KBNameDep = Annotated[str, Depends(get_kb_name)]
CallerDep = Annotated[Principal | None, Depends(get_principal)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
AccessControlDep = Annotated[AccessControl, Depends(get_access_control)]
AnswerLogDep = Annotated[AnswerLog, Depends(get_answer_log)]
HnswBuildsDep = Annotated[HnswBuilds, Depends(get_hnsw_builds)]
IngestionDep = Annotated[IngestionService, Depends(get_ingestion)]
VerifierDep = Annotated[Verifier, Depends(get_verifier)]
BackupsDep = Annotated[BackupService, Depends(get_backups)]
