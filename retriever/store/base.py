"""The one VectorStore interface over Qdrant Edge (embedded) and qdrant-client (server/cluster).

Async so the server can await it; the Edge adapter runs its (fast, in-process) calls in a thread.
Every adapter error is translated into the tree of ``retriever.errors`` (``StoreUnavailable`` for
locks and unreachable servers, ``Conflict`` for an embedder mismatch, ``NotFound``...).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from retriever.types import PassageSpec, PointRecord, ScoredPoint, SearchFilters, SparseVector, StoredPoint

if TYPE_CHECKING:
    from retriever.reindex import Versions
    from retriever.store.hnsw import BuildResult, HnswParams


@runtime_checkable
class VectorStore(Protocol):
    """A collection of snippets with named vectors ``image`` and ``text`` (cosine) and a payload."""

    #: human-readable description, e.g. "qdrant-edge:/data/qdrant" or "qdrant:http://host:6333"
    description: str
    #: HNSW search beam (``VLMRAG_HNSW_EF``); None: the adapter's default (a Qdrant server: its own)
    hnsw_ef: int | None
    #: whether ``build_index`` builds HNSW here, beside the server (Edge); a Qdrant server builds its own
    local_index_build: bool

    async def ensure_collection(self, dim: int, embedder_id: str, passage: PassageSpec | None = None) -> None:
        """Create the collection (with payload indexes) if missing; refuse a different embedder.

        ``passage``: the text embedder of the ``passage`` vector. A new collection gets that vector
        and records the embedder; an existing one with another text embedder is refused (``Conflict``);
        one made without the vector keeps working without it (``passage_spec()`` is None).
        """

    async def upsert(self, points: list[PointRecord]) -> None: ...

    async def search(
        self, vector_name: str, vector: list[float], limit: int, filters: SearchFilters | None = None,
        *, exact: bool = False,
    ) -> list[ScoredPoint]:
        """Nearest points by cosine, best first; ``exact`` scans every point instead of the HNSW index."""

    async def search_lexical(
        self, query: SparseVector, limit: int, filters: SearchFilters | None = None
    ) -> list[ScoredPoint]:
        """BM25 hits on the ``lexical`` sparse vector (IDF applied by the store), best first.

        Ties are broken by id, so both adapters return the same order. [] when the query has no
        tokens or the collection predates ``lexical`` (see ``has_lexical``).
        """

    async def has_lexical(self) -> bool:
        """Whether the collection has the ``lexical`` sparse vector (collections made before it do not)."""

    async def passage_spec(self) -> PassageSpec | None:
        """The ``passage`` vector's text embedder, None when the collection has no such vector."""

    async def retrieve(self, ids: list[str]) -> list[StoredPoint]: ...

    async def existing_ids(self, ids: list[str]) -> set[str]:
        """Which of these ids are already stored (resume / idempotent ingestion)."""

    async def delete(self, ids: list[str]) -> int: ...

    async def delete_by_filter(self, filters: SearchFilters) -> int: ...

    async def count(self, filters: SearchFilters | None = None) -> int: ...

    async def facet_counts(self, field: str) -> dict[str, int]:
        """Count of points per value of a keyword payload field (``kind``, ``source``)."""

    async def scroll(
        self, limit: int = 100, offset: str | None = None, filters: SearchFilters | None = None
    ) -> tuple[list[StoredPoint], str | None]: ...

    async def embedder_id(self) -> str | None:
        """The embedder identity stored with the collection, None if the collection is new."""

    async def close(self) -> None: ...

    async def drop(self) -> None:
        """Remove the whole collection (points, indexes, files) and close the store."""

    async def index_info(self) -> dict[str, int]:
        """``points``, ``segments`` and ``indexed_vectors`` (HNSW-indexed, summed over the dense vectors)."""

    async def build_index(self, hnsw: HnswParams) -> BuildResult:
        """Build HNSW while serving (only where ``local_index_build``; InvalidInput elsewhere)."""

    def versions(self) -> Versions:
        """The manager of this collection's versions (re-index, ``--drop-old``: retriever/reindex.py)."""

    def export_points(self, batch: int = 256) -> AsyncIterator[list[PointRecord]]:
        """Every stored point with all its vectors (dense and ``lexical``) and payload, ``batch`` at a time."""

    async def import_points(self, points: list[PointRecord]) -> int:
        """Write exported points back as they were (after ``ensure_collection``); returns how many."""

    def frozen(self) -> AbstractAsyncContextManager[None]:
        """While held, this process's writes wait and reads go on: a point-in-time view (backups).

        Edge: the shard's write lock (ingestion, deletes and HNSW swaps queue behind it). A Qdrant
        server has no such lock: there it freezes only this process's writes through this store.
        """


# --- helpers shared by the adapters (not part of the protocol) ------------------------------------

#: the CLIP vectors of every collection (cosine, the CLIP dimension)
VECTOR_NAMES: tuple[str, ...] = ("image", "text")
#: the text embedder's vector (cosine, its own dimension; retriever/text_embedder.py), where a collection has it
PASSAGE_VECTOR = "passage"
DENSE_VECTORS: tuple[str, ...] = (*VECTOR_NAMES, PASSAGE_VECTOR)
#: the sparse vector of new collections (BM25 term weights, IDF modifier; retriever/lexical.py)
LEXICAL_VECTOR = "lexical"
#: keyword payload indexes created with the collection (the filter and facet fields)
KEYWORD_FIELDS: tuple[str, ...] = ("kind", "source", "tags", "content_hash")


#: Versions of one collection (a re-index to a new model, an HNSW rebuild beside the server):
#: ``<collection>__v2``, ``__v3``...; the plain name is version 1.
VERSION_SEP = "__v"


def version_name(collection: str, number: int) -> str:
    return collection if number == 1 else f"{collection}{VERSION_SEP}{number}"


def version_number(collection: str, name: str) -> int | None:
    """1 for the plain name, N for ``<collection>__vN``, None for anything else."""
    if name == collection:
        return 1
    match = re.fullmatch(re.escape(collection) + re.escape(VERSION_SEP) + r"(\d+)", name)
    return int(match.group(1)) if match else None


def normalize_id(point_id: str) -> str:
    """Canonical UUID string for a point id; Qdrant accepts only UUIDs (or ints) as ids."""
    import uuid

    from retriever.errors import InvalidInput

    try:
        return str(uuid.UUID(str(point_id)))
    except ValueError as exc:
        raise InvalidInput(f"point id {point_id!r} is not a UUID string", param="id") from exc


def passage_mismatch(collection: str, stored: str, wanted: str) -> str:
    """The one wording of the text-embedder mismatch, shared by both adapters."""
    return (
        f"collection {collection!r} has passage vectors of text embedder {stored}; you are opening it with "
        f"{wanted}; set VLMRAG_TEXT_EMBEDDER to the model that built it, use another VLMRAG_COLLECTION, or reindex"
    )


def check_passage(collection: str, stored: PassageSpec | None, wanted: PassageSpec | None) -> None:
    """Conflict when the collection's text embedder differs from the configured one (None on either side: fine)."""
    from retriever.errors import Conflict

    if stored is not None and wanted is not None and not stored.same_embedder(wanted):
        raise Conflict(passage_mismatch(collection, f"{stored.embedder_id} ({stored.dim}-d)",
                                        f"{wanted.embedder_id} ({wanted.dim}-d)"))


def embedder_mismatch(collection: str, stored: str, wanted: str) -> str:
    """The one wording of the embedder-mismatch error, shared by both adapters."""
    return (
        f"collection {collection!r} was built with {stored}; you are opening it with {wanted}; "
        "use another VLMRAG_COLLECTION or reindex"
    )


def check_sparse(points: list[PointRecord]) -> None:
    """Refuse a malformed ``lexical`` vector (InvalidInput): lengths differ, negative or repeated ids."""
    from retriever.errors import InvalidInput

    for point in points:
        sparse = point.lexical
        if not sparse:
            continue
        if len(sparse.indices) != len(sparse.values):
            raise InvalidInput(f"point {point.id}: lexical vector has {len(sparse.indices)} indices and "
                               f"{len(sparse.values)} values", param="lexical")
        if min(sparse.indices) < 0 or max(sparse.indices) >= 2**32 or len(set(sparse.indices)) != len(sparse):
            raise InvalidInput(f"point {point.id}: lexical vector indices must be distinct uint32",
                               param="lexical")


def plain_vector(values: Any) -> Any:
    """A dense vector (or a multi-vector's rows) as plain Python floats, as both adapters' clients take them."""
    if hasattr(values, "tolist"):
        return values.tolist()
    if values and isinstance(values[0], (list, tuple)):
        return [[float(v) for v in row] for row in values]
    return [float(v) for v in values]


def lexical_order(hits: list[ScoredPoint]) -> list[ScoredPoint]:
    """Best BM25 score first, ties by id: BM25 ties are common and the adapters order them differently."""
    return sorted(hits, key=lambda hit: (-round(hit.score, 4), hit.id))


def check_vectors(points: list[PointRecord], dim: int | None, passage_dim: int | None = None) -> None:
    """Refuse points without vectors, unknown vector names or a wrong dimension (InvalidInput).

    ``passage_dim``: the collection's ``passage`` dimension, None when it has no such vector.
    """
    from retriever.errors import InvalidInput

    for point in points:
        if not point.vectors:
            raise InvalidInput(f"point {point.id} has no vector", param="vectors")
        for name, vector in point.vectors.items():
            if name == PASSAGE_VECTOR:
                if passage_dim is None:
                    raise InvalidInput(f"point {point.id}: this collection has no passage vector", param="vectors")
                rows = vector if vector and isinstance(vector[0], (list, tuple)) else [vector]  # multi-vector
                bad = next((i for i, row in enumerate(rows) if len(row) != passage_dim), None)
                if bad is not None:
                    where = f" row {bad}" if len(rows) > 1 else ""
                    raise InvalidInput(f"point {point.id}: vector 'passage'{where} has {len(rows[bad])} dimensions, "
                                       f"expected {passage_dim}", param="vectors")
                continue
            if name not in VECTOR_NAMES:
                raise InvalidInput(f"point {point.id}: unknown vector {name!r}", param="vectors")
            if dim is not None and len(vector) != dim:
                raise InvalidInput(
                    f"point {point.id}: vector {name!r} has {len(vector)} dimensions, expected {dim}",
                    param="vectors",
                )
