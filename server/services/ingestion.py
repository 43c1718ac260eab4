"""Ingestion through the API (no FastAPI here): uploaded files and single snippets into a knowledge base.

Uploaded files go through the readers ``vlmrag ingest`` uses (``retriever/ingest/readers.py::read_file``,
the one suffix dispatcher; only files that stand alone: PDF, text/Markdown, images) and the same
pipeline: a PDF becomes one ``page`` snippet per page, a text file one ``text`` snippet per passage, an
image one snippet. Each upload gets its own report; a bad file never fails the others.

After anything was stored, the KB's HNSW build may start (``HnswBuilds.maybe_start`` decides).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from retriever.errors import InvalidInput
from retriever.ingest.pipeline import IngestReport
from retriever.ingest.readers import STANDALONE_SUFFIXES, read_file
from retriever.knowledge_base import KnowledgeBase
from server.api_models import FileFailure, FileReport, IngestFilesResponse, SnippetCreated
from server.knowledge_bases import KnowledgeBases
from server.limits import check_text_chars, check_upload_count
from server.metrics import Metrics
from server.services.hnsw_builds import HnswBuilds
from server.services.links import snippet_info
from server.settings import Settings

_UNSAFE = re.compile(r"[^\w.\- ()+,@]+")
_MAX_NAME = 200
_UPLOAD_HINT = "upload PDF, text, Markdown or image files"


@dataclass(frozen=True, slots=True)
class UploadedFile:
    """One file of a multipart request: the name the client gave and its bytes (a spooled file)."""

    filename: str | None
    file: BinaryIO


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


def file_report(filename: str, report: IngestReport) -> FileReport:
    """One upload's pipeline report as the API shows it."""
    return FileReport(
        filename=filename, ingested=report.ingested, existing=report.skipped_existing, failed=report.failed,
        ids=list(report.ids),
        failures=[FileFailure(key=f.key, reason=f.reason, status=f.status) for f in report.failures],
    )


def _save(upload: UploadedFile, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    upload.file.seek(0)
    with target.open("wb") as out:
        shutil.copyfileobj(upload.file, out, length=1 << 20)


class IngestionService:
    """Adds to a knowledge base for the API; one instance per app, built in the lifespan."""

    def __init__(self, settings: Settings, knowledge_bases: KnowledgeBases, metrics: Metrics,
                 hnsw_builds: HnswBuilds) -> None:
        self.settings = settings
        self.kbs = knowledge_bases
        self.metrics = metrics
        self.hnsw_builds = hnsw_builds

    async def ingest_files(
        self, kb_name: str, files: Sequence[UploadedFile], tags: Iterable[str] = (),
    ) -> IngestFilesResponse:
        """Each file through the readers and the pipeline, one report per file (in upload order)."""
        if not files:
            raise InvalidInput("no files uploaded", param="files", code="no_files")
        check_upload_count(self.settings, len(files))
        kb = await self.kbs.get(kb_name)
        reports: list[FileReport] = []
        with tempfile.TemporaryDirectory(prefix="vlmrag-upload-") as tmp:
            for index, upload in enumerate(files):
                name = safe_filename(upload.filename, index)
                # One folder per upload: names may repeat, and an image must not pick up a sidecar.
                path = Path(tmp) / str(index) / name
                await asyncio.to_thread(_save, upload, path)
                items = read_file(path, name, accept=STANDALONE_SUFFIXES, hint=_UPLOAD_HINT)
                report = await kb.ingest(items, tags=list(tags))
                reports.append(file_report(name, report))
        await self._stored(kb_name, kb, sum(r.ingested for r in reports))
        return IngestFilesResponse(files=reports)

    async def add_snippet(
        self, kb_name: str, *, image: bytes | None = None, filename: str | None = None, text: str | None = None,
        source: str = "", tags: Iterable[str] = (), page: int | None = None, extra: dict[str, Any] | None = None,
    ) -> SnippetCreated:
        """One snippet (image, text or both) through the pipeline; ``created`` is False when it was there."""
        check_text_chars(self.settings, text, "text")
        if image is not None and not image:
            raise InvalidInput("the uploaded image is empty", param="image", code="empty_image")
        kb = await self.kbs.get(kb_name)
        snippet_id, created = await kb.add_snippet(image, text, source, list(tags), filename, page=page, extra=extra)
        if created:
            await self._stored(kb_name, kb, 1)
        point = await kb.get(snippet_id)
        return SnippetCreated(id=snippet_id, created=created,
                              snippet=snippet_info(point.id, point.payload, self.settings.public_url, kb_name))

    async def _stored(self, kb_name: str, kb: KnowledgeBase, count: int) -> None:
        """Count what was stored; then the KB's HNSW build may be due."""
        self.metrics.kb_ingested.labels(kb_name).inc(count)
        if count:
            await self.hnsw_builds.maybe_start(kb_name, kb)
