"""POST /v1/ingest/files: upload documents (PDF, text, Markdown, images) to the knowledge base.

The same readers and pipeline as ``vlmrag ingest``: a PDF becomes one ``page`` snippet per page
(rendered image + extracted text), a text file one ``text`` snippet per passage, an image one
snippet. Each upload gets its own report (ingested / already present / failed and why); a bad file
never fails the others, so the response is 200 whenever the request itself was acceptable.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile

from retriever.errors import InvalidInput
from retriever.ingest.readers import (
    IMAGE_SUFFIXES,
    REFUSED_IMAGE_SUFFIXES,
    TEXT_SUFFIXES,
    IngestItem,
    failed_item,
    image_item,
    read_pdf,
    read_text_file,
)
from server.api_models import FileFailure, FileReport, IngestFilesResponse
from server.auth import AdminAuth
from server.deps import HnswBuildsDep, KBNameDep, KnowledgeBaseDep, MetricsDep, SettingsDep
from server.limits import check_upload_count

router = APIRouter(tags=["snippets"], dependencies=[AdminAuth])

_UNSAFE = re.compile(r"[^\w.\- ()+,@]+")
_MAX_NAME = 200


def safe_filename(name: str | None, index: int) -> str:
    """The upload's base name without path parts or odd characters (it becomes the ``source``)."""
    base = Path((name or "").replace("\\", "/")).name.strip()
    base = _UNSAFE.sub("_", base).strip(" .")
    if not base:
        return f"upload-{index + 1}"
    if len(base) > _MAX_NAME:
        stem, dot, suffix = base.rpartition(".")
        base = f"{stem[: _MAX_NAME - len(suffix) - 1]}.{suffix}" if dot and len(suffix) < 10 else base[:_MAX_NAME]
    return base


def items_for(path: Path, source: str) -> Iterator[IngestItem]:
    """The snippets of one uploaded file, by its suffix; anything else is reported as unsupported."""
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        yield from read_pdf(path, source=source)
    elif suffix in TEXT_SUFFIXES:
        yield from read_text_file(path, source)
    elif suffix in IMAGE_SUFFIXES or suffix in REFUSED_IMAGE_SUFFIXES:
        yield image_item(path, source)  # refused formats get the pipeline's 415 reason
    else:
        yield failed_item(source, f"unsupported file type {suffix or '(none)'!r}: upload PDF, text, "
                                  f"Markdown or image files")


def _save(upload: UploadFile, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    upload.file.seek(0)
    with target.open("wb") as out:
        shutil.copyfileobj(upload.file, out, length=1 << 20)


@router.post("/v1/ingest/files", response_model=IngestFilesResponse)
async def ingest_files(
    kb: KnowledgeBaseDep, kb_name: KBNameDep, settings: SettingsDep, metrics: MetricsDep, builds: HnswBuildsDep,
    files: Annotated[list[UploadFile], File(description="PDF, text/Markdown or image files.")],
    tags: Annotated[list[str] | None, Form(description="Tags for every snippet created.")] = None,
) -> IngestFilesResponse:
    """Ingest each uploaded file through the ingestion pipeline; one report per file."""
    if not files:
        raise InvalidInput("no files uploaded", param="files", code="no_files")
    check_upload_count(settings, len(files))
    reports: list[FileReport] = []
    with tempfile.TemporaryDirectory(prefix="vlmrag-upload-") as tmp:
        for index, upload in enumerate(files):
            name = safe_filename(upload.filename, index)
            # One folder per upload: names may repeat, and an image must not pick up a sidecar.
            path = Path(tmp) / str(index) / name
            await asyncio.to_thread(_save, upload, path)
            report = await kb.ingest(items_for(path, name), tags=tags or [])
            metrics.kb_ingested.labels(kb_name).inc(report.ingested)
            reports.append(FileReport(
                filename=name, ingested=report.ingested, existing=report.skipped_existing,
                failed=report.failed, ids=list(report.ids),
                failures=[FileFailure(key=f.key, reason=f.reason, status=f.status) for f in report.failures],
            ))
    if any(r.ingested for r in reports):
        await builds.maybe_start(kb_name, kb)
    return IngestFilesResponse(files=reports)
