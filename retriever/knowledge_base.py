"""The knowledge base facade: one object over embedder, store, blobs, retriever and ingestion.

The server (``app.state``) and the CLI hold one ``KnowledgeBase`` built by
``server/wiring.py::build_knowledge_base``. Deleting removes the point first and then its blobs,
unless another point still references them (the same image under another source or caption).
That reference check is one indexed ``count`` per distinct ``content_hash`` of the deleted points.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from PIL import Image

from retriever.blobs import BlobStore
from retriever.embedder import ClipEmbedder
from retriever.errors import ConfigurationError, InvalidInput, NotFound, VlmragError
from retriever.images import MEDIA_TYPES, SUFFIXES, THUMBNAIL_MEDIA_TYPE
from retriever.ingest.pipeline import IngestPipeline, IngestReport, ProgressFn
from retriever.ingest.readers import IngestItem
from retriever.plan import RetrievalPlan
from retriever.search import CandidatePool, OcrFn, QueryVectors, Retriever
from retriever.store.base import VectorStore, normalize_id
from retriever.types import Candidate, SearchFilters, StoredPoint

if TYPE_CHECKING:
    from retriever.text_embedder import TextEmbedder

log = logging.getLogger(__name__)

_SCROLL_PAGE = 1000
_COUNT_CONCURRENCY = 32  # reference counts in flight while collecting the blobs of a bulk delete
_MEDIA_BY_SUFFIX = {suffix: MEDIA_TYPES[fmt] for fmt, suffix in SUFFIXES.items()} | {".jpeg": "image/jpeg"}


class KnowledgeBase:
    """Search, read, add and delete multimodal snippets."""

    def __init__(
        self, embedder: ClipEmbedder | None, store: VectorStore, blobs: BlobStore, *,
        retriever: Retriever | None = None, pipeline: IngestPipeline | None = None, collection: str = "",
        text_embedder: TextEmbedder | None = None,
    ) -> None:
        # embedder=None: a read/delete-only knowledge base (stats, get, delete) that skips loading
        # the CLIP model; search and ingestion then raise ConfigurationError.
        self.embedder = embedder
        self.text_embedder = text_embedder  # the ``passage`` vector's model, shared like CLIP; None: none
        self.store = store
        self.blobs = blobs
        self._retriever = retriever or (Retriever(embedder, store) if embedder else None)
        self._pipeline = pipeline or (IngestPipeline(embedder, store, blobs) if embedder else None)
        self.collection = collection

    @property
    def has_retriever(self) -> bool:
        """Whether it was opened with a CLIP model (``retriever`` raises otherwise)."""
        return self._retriever is not None

    @property
    def retriever(self) -> Retriever:
        if self._retriever is None:
            raise ConfigurationError("this knowledge base was opened without a CLIP model (read/delete only)")
        return self._retriever

    @property
    def pipeline(self) -> IngestPipeline:
        if self._pipeline is None:
            raise ConfigurationError("this knowledge base was opened without a CLIP model (read/delete only)")
        return self._pipeline

    # --- read --------------------------------------------------------------------------------------
    async def search(
        self, text: str | None = None, images: list[Image.Image] | None = None, plan: RetrievalPlan | None = None,
        *, ocr: OcrFn | None = None, embedded: asyncio.Future[tuple[QueryVectors, float]] | None = None,
    ) -> CandidatePool:
        """CLIP (both vectors) and BM25 retrieval as ``plan`` says, fused; see ``retriever.search.Retriever``."""
        return await self.retriever.search(text, images, plan, ocr=ocr, embedded=embedded)

    async def get(self, point_id: str) -> StoredPoint:
        """One snippet by id; ``NotFound`` if absent (or not even a valid id)."""
        try:
            canonical = normalize_id(point_id)
        except InvalidInput as exc:
            raise NotFound(f"no snippet {point_id!r}") from exc
        found = await self.store.retrieve([canonical])
        if not found:
            raise NotFound(f"no snippet {point_id!r}")
        return found[0]

    async def list_snippets(
        self, limit: int, offset: str | None = None, filters: SearchFilters | None = None,
    ) -> tuple[list[StoredPoint], str | None]:
        """One page of snippets in store order and the offset of the next page (None after the last)."""
        return await self.store.scroll(limit, offset, filters)

    async def count(self, filters: SearchFilters | None = None) -> int:
        """How many snippets (matching ``filters``) the store holds."""
        return await self.store.count(filters)

    async def image_bytes(self, point_id: str, thumbnail: bool = False) -> tuple[bytes, str]:
        """(bytes, media type) of a snippet's original image or its JPEG thumbnail."""
        point = await self.get(point_id)
        ref = point.payload.thumb_ref if thumbnail else point.payload.image_ref
        if not ref:
            raise NotFound(f"snippet {point_id} has no image")
        data = await asyncio.to_thread(self.blobs.get, ref)
        if thumbnail:
            return data, THUMBNAIL_MEDIA_TYPE
        info = point.payload.extra.get("image") or {}
        media_type = info.get("media_type") if isinstance(info, dict) else None
        suffix = "." + ref.rsplit(".", 1)[-1] if "." in ref else ""
        return data, media_type or _MEDIA_BY_SUFFIX.get(suffix, "application/octet-stream")

    async def snippet_image(self, candidate: Candidate, *, thumbnail: bool = False) -> bytes | None:
        """A candidate's image bytes straight from the blob its payload names; None if it has none or it is gone."""
        ref = candidate.payload.thumb_ref if thumbnail else candidate.payload.image_ref
        if not ref:
            return None
        try:
            return await asyncio.to_thread(self.blobs.get, ref)
        except VlmragError as exc:  # a missing blob costs the image, never the request
            log.warning("no image for snippet %s: %s", candidate.id, exc.message)
            return None

    async def stats(self) -> dict[str, Any]:
        """Snippet count, counts by kind and by source, embedder identity, store and blob backends."""
        count, by_kind, by_source, lexical, passage = await asyncio.gather(
            self.store.count(), self.store.facet_counts("kind"), self.store.facet_counts("source"),
            self.store.has_lexical(), self.store.passage_spec(),
        )
        return {
            "count": count,
            "by_kind": dict(sorted(by_kind.items())),
            "by_source": dict(sorted(by_source.items(), key=lambda kv: (-kv[1], kv[0]))),
            "embedder": await self.store.embedder_id() or (self.embedder.identity if self.embedder else None),
            "store": self.store.description,
            "collection": self.collection,
            "blobs": getattr(self.blobs, "description", type(self.blobs).__name__),
            # False: a collection made before BM25: dense search only until `vlmrag backfill-lexical`
            "lexical": lexical,
            # the text embedder of the ``passage`` vector; null: a collection made without it (CLIP text
            # and BM25 only) until `vlmrag backfill-passage`
            "passage": {"embedder": passage.embedder_id, "dim": passage.dim, "sections": passage.sections}
            if passage else None,
            "text_embedder": self.text_embedder.identity if self.text_embedder else None,
        }

    # --- write -------------------------------------------------------------------------------------
    async def add_snippet(
        self, image_bytes: bytes | None, text: str | None, source: str = "", tags: Iterable[str] = (),
        filename: str | None = None, *, page: int | None = None, extra: dict[str, Any] | None = None,
    ) -> tuple[str, bool]:
        """Add one snippet (image, text or both); returns (id, created). Raises on bad input."""
        return await self.pipeline.add_snippet(image_bytes, text, source, tags, filename, page=page, extra=extra)

    async def ingest(
        self, items: Iterable[IngestItem], tags: Iterable[str] = (), progress: ProgressFn | None = None,
        total: int | None = None,
    ) -> IngestReport:
        """Batch ingestion; bad items are reported in the result (see ``IngestPipeline.run``)."""
        return await self.pipeline.run(items, tags=tags, progress=progress, total=total)

    async def delete(self, point_id: str) -> None:
        """Delete one snippet, then its blobs if nothing else references them; ``NotFound`` if absent."""
        point = await self.get(point_id)
        await self.store.delete([point.id])
        await self._collect_blobs([point])

    async def delete_by_source(self, source: str) -> int:
        """Delete every snippet whose ``source`` equals ``source``; returns how many."""
        if not source:
            raise InvalidInput("source must not be empty", param="source")
        filters = SearchFilters(source=source)
        doomed: list[StoredPoint] = []
        offset: str | None = None
        while True:
            page, offset = await self.store.scroll(_SCROLL_PAGE, offset, filters)
            doomed.extend(page)
            if offset is None or not page:
                break
        if not doomed:
            return 0
        # By id, not by filter: exactly the points whose blobs we are about to collect.
        deleted = await self.store.delete([p.id for p in doomed])
        await self._collect_blobs(doomed)
        return deleted

    async def _collect_blobs(self, deleted: list[StoredPoint]) -> None:
        """Remove the blobs of deleted points that no remaining point references."""
        # A point's blobs are keyed by its image bytes (the original) and tagged with its content
        # hash (the thumbnail), so only points of the same content_hash can share them: one indexed
        # count per hash answers "still used?" without scanning the collection.
        refs_by_hash: dict[str, set[str]] = {}
        for point in deleted:
            refs = {r for r in (point.payload.image_ref, point.payload.thumb_ref) if r}
            if refs and point.payload.content_hash:
                refs_by_hash.setdefault(point.payload.content_hash, set()).update(refs)
            elif refs:  # no hash to check references by: keep the blobs (an orphan is harmless)
                log.warning("snippet %s has blobs but no content_hash; keeping %s", point.id, sorted(refs))
        hashes = sorted(refs_by_hash)
        doomed: set[str] = set()
        for start in range(0, len(hashes), _COUNT_CONCURRENCY):
            chunk = hashes[start:start + _COUNT_CONCURRENCY]
            counts = await asyncio.gather(*(self.store.count(SearchFilters(content_hash=h)) for h in chunk))
            doomed.update(ref for h, n in zip(chunk, counts, strict=True) if n == 0 for ref in refs_by_hash[h])
        for ref in sorted(doomed):
            try:
                await asyncio.to_thread(self.blobs.delete, ref)
            except (OSError, InvalidInput) as exc:  # an orphan blob is harmless; log and go on
                log.warning("could not delete blob %s: %s", ref, exc)

    async def close(self) -> None:
        """Close the store (the embedder and blob store hold no connections)."""
        await self.store.close()
