"""GET /v1/models: the model ids clients put in their SDK: the alias, and ``<alias>/<kb>`` per knowledge base."""

from __future__ import annotations

from fastapi import APIRouter

from server.auth import ChatAuth
from server.deps import CallerDep, KnowledgeBasesDep, SettingsDep
from server.knowledge_bases import DEFAULT_KB
from server.protocol import ModelCard, ModelList

router = APIRouter(tags=["chat"], dependencies=[ChatAuth])


@router.get("/v1/models", response_model=ModelList)
async def list_models(settings: SettingsDep, caller: CallerDep, kbs: KnowledgeBasesDep) -> ModelList:
    """The alias (the caller's default KB) and one ``<alias>/<kb>`` per other KB the caller may use."""
    names = [n for n in await kbs.names() if n != DEFAULT_KB and caller is not None and caller.may_use(n)]
    return ModelList(data=[ModelCard(id=settings.model_alias)]
                     + [ModelCard(id=f"{settings.model_alias}/{n}") for n in names])
