"""GET /v1/models: the model alias clients put in their SDK."""

from __future__ import annotations

from fastapi import APIRouter

from server.auth import ChatAuth
from server.deps import SettingsDep
from server.protocol import ModelCard, ModelList

router = APIRouter(tags=["chat"], dependencies=[ChatAuth])


@router.get("/v1/models", response_model=ModelList)
async def list_models(settings: SettingsDep) -> ModelList:
    return ModelList(data=[ModelCard(id=settings.model_alias)])
