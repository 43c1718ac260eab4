"""VectorStore over qdrant-client's async API: a Qdrant server/cluster, or the client's local mode.

The collection has named cosine vectors ``image`` and ``text``, keyword payload indexes on
``kind``, ``source``, ``tags``, ``content_hash``, and the embedder identity in the collection's
``metadata`` (``{"vlmrag_embedder_id": ..., "vlmrag_dim": ...}``; Qdrant >= 1.16 stores it). A
server that drops the metadata leaves only the vector size to check, logged as a warning. New
collections also get the sparse vector ``lexical`` (BM25 weights from retriever/lexical.py, IDF
modifier: Qdrant >= 1.10); one made before it keeps working, with ``search_lexical`` returning [].

Client errors are translated: unreachable -> ``StoreUnavailable`` naming the URL, 401/403 ->
``ConfigurationError``, 400/422 -> ``InvalidInput``, 404 -> ``NotFound``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
from qdrant_client import AsyncQdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from retriever.errors import (
    ConfigurationError,
    Conflict,
    InvalidInput,
    NotFound,
    StoreUnavailable,
    VlmragError,
)
from retriever.store.base import (
    KEYWORD_FIELDS,
    LEXICAL_VECTOR,
    PASSAGE_VECTOR,
    VECTOR_NAMES,
    check_passage,
    check_sparse,
    check_vectors,
    embedder_mismatch,
    lexical_order,
    normalize_id,
    plain_vector,
)
from retriever.types import (
    PassageSpec,
    PointRecord,
    ScoredPoint,
    SearchFilters,
    SnippetPayload,
    SparseVector,
    StoredPoint,
)

if TYPE_CHECKING:
    from retriever.reindex import Versions
    from retriever.store.hnsw import BuildResult, HnswParams

log = logging.getLogger(__name__)

META_EMBEDDER = "vlmrag_embedder_id"
META_DIM = "vlmrag_dim"
META_PASSAGE_EMBEDDER = "vlmrag_passage_embedder_id"
_FACET_LIMIT = 100_000
_SCROLL_PAGE = 1_000
T = TypeVar("T")


def build_filter(filters: SearchFilters | None) -> models.Filter | None:
    """SearchFilters -> qdrant-client Filter (source and content_hash exact; tags and kind: any of)."""
    if filters is None or filters.is_empty():
        return None
    must: list[Any] = []
    if filters.source:
        must.append(models.FieldCondition(key="source", match=models.MatchValue(value=filters.source)))
    if filters.tags:
        must.append(models.FieldCondition(key="tags", match=models.MatchAny(any=list(filters.tags))))
    if filters.kind:
        must.append(models.FieldCondition(key="kind", match=models.MatchAny(any=list(filters.kind))))
    if filters.content_hash:
        must.append(models.FieldCondition(key="content_hash", match=models.MatchValue(value=filters.content_hash)))
    return models.Filter(must=must)


def _consistency(value: str | int) -> models.ReadConsistencyType | int:
    if isinstance(value, int) or str(value).isdigit():
        return int(value)
    return models.ReadConsistencyType(str(value))


_vector = plain_vector  # retriever/store/base.py


def _sparse(vector: SparseVector) -> models.SparseVector:
    return models.SparseVector(indices=list(vector.indices), values=list(vector.values))


def _point_vectors(point: PointRecord, lexical: bool) -> dict[str, Any]:
    vectors: dict[str, Any] = {name: _vector(v) for name, v in point.vectors.items()}
    if lexical and point.lexical:  # an empty sparse vector is simply absent: nothing to match
        vectors[LEXICAL_VECTOR] = _sparse(point.lexical)
    return vectors


def _point_structs(points: list[PointRecord], lexical: bool) -> list[models.PointStruct]:
    return [
        models.PointStruct(id=normalize_id(p.id), vector=_point_vectors(p, lexical), payload=p.payload.to_dict())
        for p in points
    ]


def _exported(record: Any) -> PointRecord:
    """A scrolled record (``with_vectors``) as the PointRecord that wrote it."""
    vectors = dict(record.vector or {}) if isinstance(record.vector, dict) else {}
    sparse = vectors.pop(LEXICAL_VECTOR, None)
    lexical = SparseVector(list(sparse.indices), [float(v) for v in sparse.values]) if sparse is not None else None
    return PointRecord(str(record.id), {name: _vector(v) for name, v in vectors.items()},
                       SnippetPayload.from_dict(record.payload or {}), lexical)


class RemoteStore:
    """A collection on a Qdrant server (or in qdrant-client's local mode) via the async client."""

    #: the server builds HNSW itself (its optimizer); ``build_index`` refuses
    local_index_build = False

    def __init__(
        self, client: AsyncQdrantClient, collection: str, *, shard_number: int = 1,
        replication_factor: int = 1, write_consistency_factor: int = 1,
        read_consistency: str | int = "majority", url: str = "",
    ) -> None:
        self.client = client
        self.collection = collection
        self.url = url or "qdrant-client"
        self.description = f"qdrant:{self.url}/{collection}" if url else f"qdrant-local/{collection}"
        self._shards = shard_number
        self._replicas = replication_factor
        self._write_factor = write_consistency_factor
        self._consistency = _consistency(read_consistency)
        self._version_kwargs: dict[str, Any] = {
            "url": url, "shard_number": shard_number, "replication_factor": replication_factor,
            "write_consistency_factor": write_consistency_factor, "read_consistency": read_consistency,
        }
        #: unused: the server searches with its collection's ``hnsw_config.ef``
        self.hnsw_ef: int | None = None
        # Local mode ignores consistency; passing it there only produces warnings.
        self._read_kwargs: dict[str, Any] = {"consistency": self._consistency} if url else {}
        self._exists: bool | None = None
        self._dim: int | None = None
        self._embedder: str | None = None
        self._lexical = False  # the collection has the ``lexical`` sparse vector
        self._passage: PassageSpec | None = None  # the ``passage`` vector and its text embedder
        self._warned_no_lexical = False
        self._writes = asyncio.Lock()  # held by ``frozen`` (a backup's point-in-time view of this process's writes)

    async def _call(self, awaitable: Awaitable[T]) -> T:
        """Await a client call, translating its errors into retriever.errors."""
        try:
            return await awaitable
        except VlmragError:
            raise
        except UnexpectedResponse as exc:
            detail = exc.content.decode("utf-8", "replace")[:300] if exc.content else exc.reason_phrase
            status = exc.status_code or 0
            if status in (401, 403):
                raise ConfigurationError(
                    f"Qdrant at {self.url} refused the API key (HTTP {status}); check VLMRAG_QDRANT_API_KEY"
                ) from exc
            if status == 404:
                raise NotFound(f"Qdrant at {self.url}: {detail}") from exc
            if status in (400, 422):
                raise InvalidInput(f"Qdrant at {self.url} rejected the request: {detail}") from exc
            raise StoreUnavailable(f"Qdrant at {self.url} failed (HTTP {status}): {detail}") from exc
        except (ResponseHandlingException, httpx.HTTPError, ConnectionError, TimeoutError) as exc:
            raise StoreUnavailable(f"Qdrant at {self.url} is unreachable: {exc}") from exc
        except ValueError as exc:  # local mode: unknown collection / vector name, wrong dimension
            if "not found" in str(exc).lower():
                raise NotFound(f"{self.description}: {exc}") from exc
            raise InvalidInput(f"{self.description} rejected the request: {exc}") from exc
        except Exception as exc:  # grpc and other transport errors have no common base we can import
            raise StoreUnavailable(f"Qdrant at {self.url} failed: {exc}") from exc

    # --- lifecycle -----------------------------------------------------------------------------
    async def open(self) -> None:
        """Check the server answers and read the collection's metadata (if it exists)."""
        await self._call(self.client.get_collections())
        await self._refresh()

    async def _refresh(self) -> None:
        self._exists = await self._call(self.client.collection_exists(self.collection))
        if not self._exists:
            return
        info = await self._call(self.client.get_collection(self.collection))
        metadata = getattr(info.config, "metadata", None) or {}
        self._embedder = metadata.get(META_EMBEDDER)
        vectors = info.config.params.vectors
        self._dim = int(metadata.get(META_DIM) or (vectors["text"].size if isinstance(vectors, dict) else 0))
        self._lexical = LEXICAL_VECTOR in (info.config.params.sparse_vectors or {})
        passage = vectors.get(PASSAGE_VECTOR) if isinstance(vectors, dict) else None
        self._passage = PassageSpec(int(passage.size), str(metadata.get(META_PASSAGE_EMBEDDER) or "unknown"),
                                    passage.multivector_config is not None) if passage is not None else None

    async def ensure_collection(self, dim: int, embedder_id: str, passage: PassageSpec | None = None) -> None:
        """Create the collection with payload indexes, or refuse a different embedder."""
        await self._refresh()
        if not self._exists:
            vectors = {name: models.VectorParams(size=dim, distance=models.Distance.COSINE) for name in VECTOR_NAMES}
            metadata: dict[str, Any] = {META_EMBEDDER: embedder_id, META_DIM: dim}
            if passage is not None:
                multi = models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM) if passage.sections \
                    else None  # sections: one row per section, a point scores by its best row
                vectors[PASSAGE_VECTOR] = models.VectorParams(size=passage.dim, distance=models.Distance.COSINE,
                                                              multivector_config=multi)
                metadata[META_PASSAGE_EMBEDDER] = passage.embedder_id
            await self._call(self.client.create_collection(
                self.collection,
                vectors_config=vectors,
                # BM25 term weights; IDF applied by the server at query time (same as Edge's modifier).
                sparse_vectors_config={LEXICAL_VECTOR: models.SparseVectorParams(modifier=models.Modifier.IDF)},
                shard_number=self._shards, replication_factor=self._replicas,
                write_consistency_factor=self._write_factor,
                metadata=metadata,
            ))
            # Local mode ignores payload indexes (and warns); a server uses them for filters and facets.
            for field in KEYWORD_FIELDS if self._read_kwargs else ():
                await self._call(self.client.create_payload_index(
                    self.collection, field, field_schema=models.PayloadSchemaType.KEYWORD, wait=True,
                ))
            await self._refresh()
            if self._embedder is None:
                log.warning("Qdrant at %s did not keep collection metadata (server < 1.16?): the embedder "
                            "of %r cannot be checked, only its vector size", self.url, self.collection)
                self._embedder = embedder_id
            return
        if self._embedder is None:
            log.warning("collection %r has no vlmrag embedder metadata; checking the vector size only",
                        self.collection)
            if self._dim != dim:
                raise Conflict(embedder_mismatch(self.collection, f"vectors of size {self._dim}", embedder_id))
            return
        if self._embedder != embedder_id or self._dim != dim:
            raise Conflict(embedder_mismatch(self.collection, self._embedder, embedder_id))
        check_passage(self.collection, self._passage, passage)

    async def passage_spec(self) -> PassageSpec | None:
        if self._exists is None:
            await self._refresh()
        return self._passage if self._exists else None

    async def embedder_id(self) -> str | None:
        if self._exists is None:
            await self._refresh()
        return self._embedder

    async def close(self) -> None:
        await self._call(self.client.close())

    async def drop(self) -> None:
        await self._call(self.client.delete_collection(self.collection))
        self._exists = False
        await self.close()

    async def index_info(self) -> dict[str, int]:
        if await self._missing():
            return {"points": 0, "segments": 0, "indexed_vectors": 0}
        info = await self._call(self.client.get_collection(self.collection))
        return {"points": int(info.points_count or 0), "segments": int(info.segments_count or 0),
                "indexed_vectors": int(info.indexed_vectors_count or 0)}

    async def build_index(self, hnsw: HnswParams) -> BuildResult:
        raise InvalidInput(f"{self.description}: a Qdrant server builds HNSW itself")

    def versions(self) -> Versions:
        """Versions as aliased collections on this client (which stays this store's to close)."""
        from retriever.reindex import AliasVersions

        return AliasVersions(self.client, self.collection, **self._version_kwargs)

    async def export_points(self, batch: int = 256) -> AsyncIterator[list[PointRecord]]:
        if await self._missing():
            return
        offset: str | None = None
        while True:
            records, next_offset = await self._call(self.client.scroll(
                self.collection, limit=max(1, batch), offset=offset, with_payload=True, with_vectors=True,
                **self._read_kwargs,
            ))
            if records:
                yield [_exported(r) for r in records]
            if next_offset is None or not records:
                return
            offset = str(next_offset)

    async def import_points(self, points: list[PointRecord]) -> int:
        await self.upsert(points)
        return len(points)

    @asynccontextmanager
    async def frozen(self) -> AsyncIterator[None]:
        async with self._writes:
            yield

    # --- writes --------------------------------------------------------------------------------
    async def _require(self) -> None:
        if not self._exists:
            await self._refresh()
        if not self._exists:
            raise NotFound(f"collection {self.collection!r} does not exist at {self.url}; ingest first")

    async def upsert(self, points: list[PointRecord]) -> None:
        if not points:
            return
        await self._require()
        check_vectors(points, self._dim or None, self._passage.dim if self._passage else None)
        check_sparse(points)
        if not self._lexical and not self._warned_no_lexical and any(p.lexical for p in points):
            self._warned_no_lexical = True
            log.warning("collection %r predates the lexical vector: BM25 vectors are not stored "
                        "(dense search only); reindex to add them", self.collection)
        # pydantic validation of thousands of 512-d vectors takes a while: keep it off the loop.
        structs = await asyncio.to_thread(_point_structs, points, self._lexical)
        async with self._writes:
            await self._call(self.client.upsert(self.collection, points=structs, wait=True))

    async def delete(self, ids: list[str]) -> int:
        present = await self.existing_ids(ids)
        if present:
            async with self._writes:
                await self._call(self.client.delete(
                    self.collection, points_selector=models.PointIdsList(points=sorted(present)), wait=True,
                ))
        return len(present)

    async def delete_by_filter(self, filters: SearchFilters) -> int:
        query_filter = build_filter(filters)
        if query_filter is None:
            raise InvalidInput("delete_by_filter needs at least one filter (source, tags, kind or content_hash)")
        matched = await self.count(filters)
        if matched:
            async with self._writes:
                await self._call(self.client.delete(
                    self.collection, points_selector=models.FilterSelector(filter=query_filter), wait=True,
                ))
        return matched

    # --- reads ---------------------------------------------------------------------------------
    async def _missing(self) -> bool:
        if not self._exists:
            await self._refresh()
        return not self._exists

    async def search(
        self, vector_name: str, vector: list[float], limit: int, filters: SearchFilters | None = None,
        *, exact: bool = False,
    ) -> list[ScoredPoint]:
        if vector_name not in VECTOR_NAMES and vector_name != PASSAGE_VECTOR:
            raise InvalidInput(f"unknown vector {vector_name!r}; expected one of {VECTOR_NAMES}")
        if limit <= 0 or await self._missing() or (vector_name == PASSAGE_VECTOR and self._passage is None):
            return []
        # The server builds HNSW on its own; ``exact`` asks it for a full scan instead (local mode
        # always scans, and warns about search params).
        params = models.SearchParams(exact=True) if exact and self._read_kwargs else None
        query: Any = _vector(vector)
        if vector_name == PASSAGE_VECTOR and self._passage is not None and self._passage.sections:
            query = [query]  # a multi-vector field takes a multi-vector query: max_sim of one row
        response = await self._call(self.client.query_points(
            self.collection, query=query, using=vector_name, query_filter=build_filter(filters),
            limit=limit, with_payload=True, with_vectors=False, search_params=params, **self._read_kwargs,
        ))
        return [
            ScoredPoint(str(p.id), float(p.score), SnippetPayload.from_dict(p.payload or {}))
            for p in response.points
        ]

    async def search_lexical(
        self, query: SparseVector, limit: int, filters: SearchFilters | None = None
    ) -> list[ScoredPoint]:
        if limit <= 0 or not query or await self._missing() or not self._lexical:
            return []
        check_sparse([PointRecord("query", {}, SnippetPayload(kind="text"), query)])
        response = await self._call(self.client.query_points(
            self.collection, query=_sparse(query), using=LEXICAL_VECTOR, query_filter=build_filter(filters),
            limit=limit, with_payload=True, with_vectors=False, **self._read_kwargs,
        ))
        return lexical_order([
            ScoredPoint(str(p.id), float(p.score), SnippetPayload.from_dict(p.payload or {}))
            for p in response.points
        ])

    async def has_lexical(self) -> bool:
        if self._exists is None:
            await self._refresh()
        return bool(self._exists) and self._lexical

    async def retrieve(self, ids: list[str]) -> list[StoredPoint]:
        if not ids or await self._missing():
            return []
        wanted = [normalize_id(i) for i in ids]
        records = await self._call(self.client.retrieve(
            self.collection, ids=wanted, with_payload=True, with_vectors=False, **self._read_kwargs,
        ))
        by_id = {str(r.id): r for r in records}
        return [StoredPoint(i, SnippetPayload.from_dict(by_id[i].payload or {})) for i in wanted if i in by_id]

    async def existing_ids(self, ids: list[str]) -> set[str]:
        if not ids or await self._missing():
            return set()
        wanted = [normalize_id(i) for i in ids]
        records = await self._call(self.client.retrieve(
            self.collection, ids=wanted, with_payload=False, with_vectors=False, **self._read_kwargs,
        ))
        return {str(r.id) for r in records}

    async def count(self, filters: SearchFilters | None = None) -> int:
        if await self._missing():
            return 0
        result = await self._call(self.client.count(self.collection, count_filter=build_filter(filters), exact=True))
        return int(result.count)

    async def facet_counts(self, field: str) -> dict[str, int]:
        if field not in KEYWORD_FIELDS:
            raise InvalidInput(f"facet field must be one of {KEYWORD_FIELDS}, not {field!r}")
        if await self._missing():
            return {}
        try:
            response = await self._call(self.client.facet(
                self.collection, key=field, limit=_FACET_LIMIT, exact=True, **self._read_kwargs,
            ))
        except (NotFound, InvalidInput):
            # Servers before 1.12 have no facet endpoint: count by scrolling instead.
            return await self._facet_by_scroll(field)
        # A value whose points were all deleted is not a facet value (Edge reports such with count 0).
        return {str(hit.value): int(hit.count) for hit in response.hits if hit.value != "" and hit.count > 0}

    async def _facet_by_scroll(self, field: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        offset: str | None = None
        while True:
            page, offset = await self.scroll(limit=_SCROLL_PAGE, offset=offset)
            for point in page:
                value = getattr(point.payload, field)
                for item in value if isinstance(value, list) else [value]:
                    if item not in (None, ""):
                        counts[str(item)] = counts.get(str(item), 0) + 1
            if offset is None:
                return counts

    async def scroll(
        self, limit: int = 100, offset: str | None = None, filters: SearchFilters | None = None
    ) -> tuple[list[StoredPoint], str | None]:
        if await self._missing():
            return [], None
        records, next_offset = await self._call(self.client.scroll(
            self.collection, scroll_filter=build_filter(filters), limit=limit,
            offset=normalize_id(offset) if offset else None, with_payload=True, with_vectors=False,
            **self._read_kwargs,
        ))
        points = [StoredPoint(str(r.id), SnippetPayload.from_dict(r.payload or {})) for r in records]
        return points, None if next_offset is None else str(next_offset)
