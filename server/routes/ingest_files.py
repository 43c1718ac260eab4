"""POST /v1/ingest/files: upload documents (PDF, text, Markdown, images) to the knowledge base.

The work (readers, temp files, reports, HNSW builds) is ``server/services/ingestion.py``'s. Each
upload gets its own report (ingested / already present / failed and why); a bad file never fails the
others, so the response is 200 whenever the request itself was acceptable.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile

from server.api_models import IngestFilesResponse
from server.auth import AdminAuth
from server.deps import IngestionDep, KBNameDep
from server.services.ingestion import UploadedFile

router = APIRouter(tags=["snippets"], dependencies=[AdminAuth])


@router.post("/v1/ingest/files", response_model=IngestFilesResponse)
async def ingest_files(
    kb_name: KBNameDep, ingestion: IngestionDep,
    files: Annotated[list[UploadFile], File(description="PDF, text/Markdown or image files.")],
    tags: Annotated[list[str] | None, Form(description="Tags for every snippet created.")] = None,
) -> IngestFilesResponse:
    """Ingest each uploaded file through the ingestion pipeline; one report per file."""
    uploads = [UploadedFile(f.filename, f.file) for f in files]
    return await ingestion.ingest_files(kb_name, uploads, tags or ())
