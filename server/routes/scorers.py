"""GET /v1/scorers: the registered relevancy scorers (``retriever/scorers.py::SCORERS``) and the default."""

from __future__ import annotations

from fastapi import APIRouter

from retriever.scorers import SCORERS
from server.api_models import ScorerInfo, ScorerList
from server.auth import ChatAuth
from server.deps import SettingsDep
from server.settings import Settings

router = APIRouter(tags=["search"], dependencies=[ChatAuth])


@router.get("/v1/scorers", response_model=ScorerList)
async def list_scorers(settings: SettingsDep) -> ScorerList:
    """Every scorer a request may name, in registry order, and the one used when it names none."""
    return ScorerList(
        scorers=[ScorerInfo(name=name, description=cls.description, threshold=cls.threshold,
                            available=_available(settings, getattr(cls, "requires", "")))
                 for name, cls in SCORERS.items()],
        default=settings.rerank_scorer,
    )


def _available(settings: Settings, requires: str) -> bool:
    """Whether the setting a scorer needs (its ``requires``, a Settings field name) is set."""
    return not requires or bool(getattr(settings, requires, None))
