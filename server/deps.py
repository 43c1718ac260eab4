"""FastAPI dependency aliases (``XDep = Annotated[X, Depends(get_x)]``) over the app state.

``get_access_control`` lives in ``server/auth.py``: the auth dependencies need it, and importing this
module (the services, torch) from there would make ``vlmrag keygen`` slow.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from retriever.knowledge_base import KnowledgeBase
from server.auth import AccessControl, get_access_control
from server.metrics import Metrics
from server.services.chat import ChatService
from server.settings import Settings
from server.state import AppState


def get_state(request: Request) -> AppState:
    """The services built by the lifespan."""
    return request.app.state.vlmrag


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_chat_service(request: Request) -> ChatService:
    return get_state(request).chat


def get_knowledge_base(request: Request) -> KnowledgeBase:
    return get_state(request).knowledge_base


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


StateDep = Annotated[AppState, Depends(get_state)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
ChatServiceDep = Annotated[ChatService, Depends(get_chat_service)]
KnowledgeBaseDep = Annotated[KnowledgeBase, Depends(get_knowledge_base)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
AccessControlDep = Annotated[AccessControl, Depends(get_access_control)]
