"""The web pages: GET / (chat) and GET /kb (knowledge base), served from ``STATIC_DIR`` (server/static).

``create_app`` mounts the same folder at ``/static`` (scripts and styles of the pages).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from retriever.errors import NotFound

router = APIRouter(tags=["pages"], include_in_schema=False)
STATIC_DIR = Path(__file__).resolve().parents[1] / "static"


def _page(name: str) -> FileResponse:
    path = STATIC_DIR / name
    if not path.is_file():
        raise NotFound(f"page {name} is not installed")
    return FileResponse(path, media_type="text/html")


@router.get("/")
async def chat_page() -> FileResponse:
    return _page("index.html")


@router.get("/kb")
async def kb_page() -> FileResponse:
    return _page("kb.html")
