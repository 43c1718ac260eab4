"""VectorStore over Qdrant Edge (``qdrant-edge-py``, the Qdrant engine in-process), pinned at 0.9.0.

Layout: one Edge shard per collection at ``<path>/<collection>/``, with ``vlmrag_meta.json`` inside
it holding the embedder identity and dimension (Edge has no collection metadata). Edge calls are
synchronous; most run in a worker thread (``asyncio.to_thread``) so Python-side work such as
building points for an upsert interleaves with the event loop. ``query`` does not: 0.9.0 holds the
GIL for the whole search (~10 ms at 100k x 512; a thread ticking every 0.5 ms stalls that long, and
two threads querying together take as long as one after the other), so a worker thread cannot free
the loop and only added ~0.5 ms: ``search`` calls it inline.

Edge raises plain ``Exception``; ``_translate`` maps them onto ``retriever.errors``. One process
per path: a second opener fails on the WAL lock, reported as ``StoreUnavailable`` naming the path.
``optimize()`` (HNSW build) holds the GIL for its whole run (~90 s at 100k): never in the serving
process. Without it every point sits in the shard's one appendable segment, scanned by one thread:
search is exact brute force, bound by memory bandwidth. Vectors are therefore stored as float16 (half
the bytes: ~10 ms instead of ~15 ms at 100k x 512, half the RAM; scores within ~5e-5 of float32 at
512-d (at most ~1e-3), top-20 overlap with float32 99.9 %, see benchmarks/bench_search.py).

HNSW: ``optimize(HnswParams(...))`` reloads the shard with an HNSW config and builds the graph of every
dense vector in place (offline ``vlmrag optimize``); beside a server, retriever/store/hnsw.py builds a
copy in a child process, and ``snapshot_to`` / ``adopt`` here copy the shard, journal the writes made
meanwhile (every write goes through ``_write``) and swap the rebuilt copy in with them replayed.
Searches then walk the graph (``hnsw_ef`` by size, ``hnsw.auto_hnsw_ef``; 256: 0.8 ms instead of 6 ms at 100k, recall@20 0.997 on
clustered data, see benchmarks/bench_hnsw.py); points added afterwards land in a new appendable
segment that is scanned exactly until the next build. ``search(..., exact=True)`` forces the scan.

New shards also have the sparse vector ``lexical`` (BM25 weights from retriever/lexical.py, IDF
modifier). Edge cannot add it to an existing shard (its config must match the segments): an older
shard keeps working, ``has_lexical()`` is False and ``search_lexical`` returns [].
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import qdrant_edge as qe

from retriever.errors import Conflict, InvalidInput, NotFound, StoreUnavailable, VlmragError
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
from retriever.store.hnsw import (
    SHARD_CONFIG_FILE,
    BuildResult,
    HnswParams,
    auto_hnsw_ef,
    build_while_serving,
    hnsw_shard_config,
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

log = logging.getLogger(__name__)

META_FILE = "vlmrag_meta.json"
#: Edge has no aliases: re-indexing (retriever/reindex.py) switches the served shard by atomically
#: replacing the symlink ``<path>/<collection>__current`` (-> ``<collection>__vN``); without it the
#: shard is ``<path>/<collection>``.
CURRENT_POINTER_SUFFIX = "__current"
_SHARD_MARKER = SHARD_CONFIG_FILE
_FACET_LIMIT = 100_000
#: Storage type of new shards' vectors. The exact scan is memory-bound, so float16 makes it ~1.5x
#: faster; CLIP cosine scores need no more than its ~3 significant digits. Only creation reads
#: it: a shard keeps the datatype it was created with (float32 shards still load and work).
VECTOR_DATATYPE = qe.VectorStorageDatatype.Float16
T = TypeVar("T")
#: Writes journalled during a rebuild beside the server are kept in memory (~4 KB a point at 512-d):
#: past this many points the rebuild is given up rather than holding gigabytes.
JOURNAL_MAX_POINTS = 100_000


def resolve_shard_dir(path: Path, collection: str) -> Path:
    """The shard directory served for ``collection``: the ``__current`` pointer's target if present."""
    pointer = path / f"{collection}{CURRENT_POINTER_SUFFIX}"
    if pointer.is_symlink():
        return path / os.readlink(pointer)
    return path / collection


def check_not_locked(path: Path, collection: str) -> None:
    """Raise StoreUnavailable when another process holds the embedded store; opens nothing (a preflight).

    Edge 0.9.0 holds an exclusive ``flock`` on the shard's ``wal`` directory while open: probing it
    non-blocking and releasing at once costs microseconds, where loading the shard costs seconds.
    """
    shard_dir = resolve_shard_dir(Path(path), collection)
    try:
        fd = os.open(shard_dir / "wal", os.O_RDONLY)
    except OSError:
        return  # no shard yet: nothing to hold; anything odd is reported when the store opens
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise StoreUnavailable(
            f"embedded store {shard_dir} is locked: another vlmrag process holds it (only one process may "
            "open an embedded store; use its API, or stop it)"
        ) from None
    except OSError:
        return  # flock unsupported here: the open itself still reports a held lock
    finally:
        os.close(fd)  # releases the probe's lock, if it got one


def _translate(exc: Exception, path: Path) -> VlmragError:
    """Map an Edge exception (message only) to our error tree."""
    message = str(exc)
    if "WAL" in message and ("WouldBlock" in message or "lock" in message.lower()):
        return StoreUnavailable(
            f"embedded store {path} is locked: another vlmrag process holds it (only one process may "
            f"open an embedded store; use its API, or stop it) [{message}]"
        )
    if "dimension error" in message or "Not existing vector name" in message or "Wrong input" in message:
        return InvalidInput(f"store rejected the request: {message}")
    return StoreUnavailable(f"embedded store {path} failed: {message}")


def build_filter(filters: SearchFilters | None) -> qe.Filter | None:
    """SearchFilters -> Edge Filter (source and content_hash exact; tags and kind: any of)."""
    if filters is None or filters.is_empty():
        return None
    must: list[Any] = []
    if filters.source:
        must.append(qe.FieldCondition("source", match=qe.MatchValue(filters.source)))
    if filters.tags:
        must.append(qe.FieldCondition("tags", match=qe.MatchAny(list(filters.tags))))
    if filters.kind:
        must.append(qe.FieldCondition("kind", match=qe.MatchAny(list(filters.kind))))
    if filters.content_hash:
        must.append(qe.FieldCondition("content_hash", match=qe.MatchValue(filters.content_hash)))
    return qe.Filter(must=must)


_vector = plain_vector  # retriever/store/base.py


def point_current_at(path: Path, collection: str, name: str) -> None:
    """Atomically point ``<path>/<collection>__current`` at the shard directory ``name`` (relative link)."""
    pointer = path / f"{collection}{CURRENT_POINTER_SUFFIX}"
    tmp = path / f".{pointer.name}.{os.urandom(4).hex()}"
    os.symlink(name, tmp)  # relative: the data dir can move
    os.replace(tmp, pointer)  # atomic: a reader sees the old or the new target, never neither
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    # Write-then-rename so a crash never leaves a half-written meta file.
    fd, tmp = tempfile.mkstemp(prefix=".meta-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _edge_vectors(point: PointRecord, lexical: bool) -> dict[str, Any]:
    vectors: dict[str, Any] = {name: _vector(v) for name, v in point.vectors.items()}
    if lexical and point.lexical:  # an empty sparse vector is simply absent: nothing to match
        vectors[LEXICAL_VECTOR] = qe.SparseVector(list(point.lexical.indices), list(point.lexical.values))
    return vectors


def _upsert_sync(shard: qe.EdgeShard, points: list[PointRecord], lexical: bool) -> None:
    # Building qe.Point converts the payload and vectors into Rust under the GIL: done in the worker
    # thread with the update, so a large batch never stalls the event loop. The payload dominates
    # (~4 µs per string value, ~65 µs for an ingested snippet), not the floats (~10 µs per 512-d
    # list); 0.9.0 has no numpy, bytes or batch path (bytes are read as a list of ints!), see
    # benchmarks/bench_upsert.py.
    edge_points = [qe.Point(normalize_id(p.id), _edge_vectors(p, lexical), p.payload.to_dict()) for p in points]
    shard.update(qe.UpdateOperation.upsert_points(edge_points))


def _exported(record: Any) -> PointRecord:
    """A scrolled record (``with_vector``) as the PointRecord that wrote it."""
    vectors = dict(record.vector or {})
    sparse = vectors.pop(LEXICAL_VECTOR, None)
    lexical = SparseVector(list(sparse.indices), [float(v) for v in sparse.values]) if sparse is not None else None
    return PointRecord(str(record.id), {name: _vector(v) for name, v in vectors.items()},
                       SnippetPayload.from_dict(record.payload or {}), lexical)


def _scroll_exported(shard: qe.EdgeShard, request: qe.ScrollRequest) -> tuple[list[PointRecord], Any]:
    records, next_offset = shard.scroll(request)
    return [_exported(r) for r in records], next_offset


class EdgeStore:
    """A collection stored as one Qdrant Edge shard under ``path``."""

    #: HNSW is built here, in a child process beside the server (``build_index``)
    local_index_build = True

    def __init__(self, path: Path, collection: str) -> None:
        self.path = Path(path)
        self.collection = collection
        self.shard_dir = resolve_shard_dir(self.path, collection)
        self.description = f"qdrant-edge:{self.shard_dir}"
        self._shard: qe.EdgeShard | None = None
        self._meta: dict[str, Any] | None = None
        self._lexical = False  # the shard has the ``lexical`` sparse vector (read from its config)
        self._passage_vector = False  # the shard has the ``passage`` dense vector (read from its config)
        self._passage_sections = False  # ... as a multi-vector of sections (``max_sim``; read from its config)
        self._warned_no_lexical = False
        self._lock = asyncio.Lock()  # serialises create/load/close, not reads
        #: serialises writes; held while the shard is copied or another is swapped in (retriever/store/hnsw.py)
        self._writes = asyncio.Lock()
        #: writes applied since ``snapshot_to``, replayed by ``adopt`` on the copy; None = not journalling
        self._journal: list[Callable[[qe.EdgeShard], Any]] | None = None
        self._journaled_points = 0  # the journal keeps the points themselves: bounded by JOURNAL_MAX_POINTS
        self._journal_overflowed = False
        self._retiring: set[asyncio.Task[None]] = set()
        #: HNSW search beam (``VLMRAG_HNSW_EF``); None = by the shard's size (hnsw.auto_hnsw_ef, set at load)
        self.hnsw_ef: int | None = None
        self._auto_ef = auto_hnsw_ef(0)

    # --- lifecycle -----------------------------------------------------------------------------
    async def open(self) -> None:
        """Load the shard if it exists, so a held lock is reported at startup."""
        if (self.shard_dir / _SHARD_MARKER).is_file():
            async with self._lock:
                await self._load()

    async def _load(self) -> None:
        if self._shard is None:
            self._shard = await self._call(qe.EdgeShard.load, str(self.shard_dir))
            self._meta = self._read_meta()
            self._read_vector_names()
            self._auto_ef = auto_hnsw_ef(int((await self._call(self._shard.info)).points_count))

    def _read_meta(self) -> dict[str, Any] | None:
        meta_path = self.shard_dir / META_FILE
        if not meta_path.is_file():
            return None
        try:
            return json.loads(meta_path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise StoreUnavailable(f"embedded store meta file {meta_path} is corrupt: {exc}") from exc

    def _read_vector_names(self) -> None:
        """Whether the shard has the ``lexical`` and the ``passage`` vectors, and ``passage``'s layout."""
        # Edge has no config getter; the shard persists its config beside the segments.
        try:
            config = json.loads((self.shard_dir / _SHARD_MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            config = {}
        passage = (config.get("vectors") or {}).get(PASSAGE_VECTOR)
        self._lexical = LEXICAL_VECTOR in (config.get("sparse_vectors") or {})
        self._passage_vector = isinstance(passage, dict)
        self._passage_sections = isinstance(passage, dict) and bool(passage.get("multivector_config"))

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.to_thread(fn, *args)
        except VlmragError:
            raise
        except Exception as exc:  # Edge raises bare Exception with a message
            raise _translate(exc, self.shard_dir) from exc

    def _call_inline(self, fn: Callable[..., T], *args: Any) -> T:
        """Run an Edge call that holds the GIL throughout on the caller's thread (see module doc)."""
        try:
            return fn(*args)
        except Exception as exc:  # Edge raises bare Exception with a message
            raise _translate(exc, self.shard_dir) from exc

    async def ensure_collection(self, dim: int, embedder_id: str, passage: PassageSpec | None = None) -> None:
        """Create the shard (named cosine vectors, keyword indexes) or check its embedders."""
        async with self._lock:
            if self._shard is None and (self.shard_dir / _SHARD_MARKER).is_file():
                await self._load()
            if self._shard is None:
                self._shard = await self._call(self._create, dim, passage)
                self._meta = None
                self._read_vector_names()
            if self._meta is None:
                if await self.count() > 0:
                    raise Conflict(embedder_mismatch(self.collection, "an unknown embedder", embedder_id))
                self._meta = {"embedder_id": embedder_id, "dim": dim}
                if passage is not None and self._passage_vector:
                    self._meta["passage"] = {"embedder_id": passage.embedder_id, "dim": passage.dim,
                                             "sections": self._passage_sections}
                _write_json_atomic(self.shard_dir / META_FILE, self._meta)
                return
            stored = self._meta.get("embedder_id")
            if stored != embedder_id or int(self._meta.get("dim", dim)) != dim:
                raise Conflict(embedder_mismatch(self.collection, str(stored), embedder_id))
            check_passage(self.collection, self._stored_passage(), passage)

    def _stored_passage(self) -> PassageSpec | None:
        entry = (self._meta or {}).get("passage")
        if not self._passage_vector or not isinstance(entry, dict):
            return None
        return PassageSpec(int(entry["dim"]), str(entry["embedder_id"]), self._passage_sections)

    async def passage_spec(self) -> PassageSpec | None:
        return self._stored_passage() if self._shard is not None else None

    def _create(self, dim: int, passage: PassageSpec | None = None) -> qe.EdgeShard:
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        vectors = {
            name: qe.EdgeVectorParams(size=dim, distance=qe.Distance.Cosine, datatype=VECTOR_DATATYPE)
            for name in VECTOR_NAMES
        }
        if passage is not None:  # sections: one row per section, a point scores by its best row
            multi = qe.MultiVectorConfig(comparator=qe.MultiVectorComparator.MaxSim) if passage.sections else None
            vectors[PASSAGE_VECTOR] = qe.EdgeVectorParams(size=passage.dim, distance=qe.Distance.Cosine,
                                                          datatype=VECTOR_DATATYPE, multivector_config=multi)
        # BM25 term weights; the IDF modifier makes the shard weigh each term by its rarity at query time.
        sparse = {LEXICAL_VECTOR: qe.EdgeSparseVectorParams(modifier=qe.Modifier.Idf)}
        shard = qe.EdgeShard.create(str(self.shard_dir), qe.EdgeConfig(vectors=vectors, sparse_vectors=sparse))
        for field in KEYWORD_FIELDS:
            shard.update(qe.UpdateOperation.create_field_index(field, qe.PayloadSchemaType.Keyword))
        return shard

    async def embedder_id(self) -> str | None:
        return None if self._meta is None else self._meta.get("embedder_id")

    async def close(self) -> None:
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        async with self._lock:
            shard, self._shard = self._shard, None
            if shard is not None:
                await self._call(shard.close)

    # --- swapping in a rebuilt copy (HNSW built beside the server: retriever/store/hnsw.py) ---------
    async def _write(self, op: Callable[[qe.EdgeShard], T], points: int = 1) -> T:
        """Apply one write to the served shard; journal it while a copy is being rebuilt."""
        async with self._writes:
            result = await self._call(op, self._require())
            if self._journal is not None:
                self._journal.append(op)
                self._journaled_points += points
                if self._journaled_points > JOURNAL_MAX_POINTS:  # the rebuilt copy would lag too far: give it up
                    self._journal, self._journal_overflowed = None, True
            return result

    async def snapshot_to(self, target: Path) -> None:
        """Copy the served shard to ``target`` and journal every write from then on (reads go on)."""
        async with self._lock, self._writes:
            shard = self._require()
            await self._call(shard.flush)
            copy = asyncio.ensure_future(asyncio.to_thread(shutil.copytree, self.shard_dir, target, symlinks=True))
            try:
                await asyncio.shield(copy)
            except asyncio.CancelledError:  # the thread copies on: wait for it, then remove what it wrote
                await asyncio.gather(copy, return_exceptions=True)
                await asyncio.to_thread(shutil.rmtree, target, True)
                raise
            self._journal, self._journaled_points, self._journal_overflowed = [], 0, False

    def discard_journal(self) -> None:
        self._journal = None

    async def adopt(self, shard_dir: Path, retire_after_s: float = 2.0) -> int:
        """Serve ``shard_dir`` (a rebuilt copy from ``snapshot_to``) instead; returns the writes replayed.

        Under the write lock: load the copy, replay the journal on it, point ``<collection>__current``
        at it (atomic; what a restart opens), then swap it in. The old shard is closed
        ``retire_after_s`` later, once reads that already hold it are done, and its directory removed.
        """
        async with self._lock, self._writes:
            journal, self._journal = self._journal, None
            if journal is None:
                if self._journal_overflowed:
                    raise Conflict(f"more than {JOURNAL_MAX_POINTS} points were written to {self.shard_dir} during "
                                   "the rebuild; it was given up (build again once the ingestion is done)")
                raise StoreUnavailable(f"embedded store {self.shard_dir}: adopt without a snapshot")
            new = await self._call(qe.EdgeShard.load, str(shard_dir))
            try:
                for op in journal:
                    await self._call(op, new)
                await self._call(new.flush)
                await asyncio.to_thread(point_current_at, self.path, self.collection, shard_dir.name)
            except BaseException:
                await self._call(new.close)
                raise
            old, old_dir = self._shard, self.shard_dir
            self._shard, self.shard_dir = new, shard_dir
            self.description = f"qdrant-edge:{shard_dir}"
            self._meta = self._read_meta()
            self._read_vector_names()
            self._auto_ef = auto_hnsw_ef(int((await self._call(new.info)).points_count))
        task = asyncio.create_task(self._retire(old, old_dir, retire_after_s))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return len(journal)

    async def _retire(self, shard: qe.EdgeShard | None, shard_dir: Path, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        try:
            if shard is not None:
                await self._call(shard.close)
            if shard_dir != self.shard_dir:
                await asyncio.to_thread(shutil.rmtree, shard_dir, True)
        except Exception:  # the new shard serves; a leftover directory only costs disk
            log.warning("could not remove the replaced shard %s", shard_dir, exc_info=True)

    async def optimize(self, hnsw: HnswParams | None = None) -> bool:
        """Run Edge's optimizers; with ``hnsw``, first reload the shard so they build HNSW graphs.

        Holds the GIL for its whole run (tens of seconds at 100k): CLI or child process only.
        """
        if hnsw is None:
            return await self._call(self._require().optimize)
        async with self._lock:
            shard = self._require()
            config = hnsw_shard_config(self.shard_dir, hnsw)
            await self._call(shard.close)
            self._shard = None
            self._shard = await self._call(qe.EdgeShard.load, str(self.shard_dir), config)
            return await self._call(self._shard.optimize)

    async def index_info(self) -> dict[str, int]:
        """``points``, ``segments`` and ``indexed_vectors`` (HNSW-indexed, summed over the dense vectors)."""
        if self._shard is None:
            return {"points": 0, "segments": 0, "indexed_vectors": 0}
        info = await self._call(self._shard.info)
        return {"points": int(info.points_count), "segments": int(info.segments_count),
                "indexed_vectors": int(info.indexed_vectors_count)}

    async def build_index(self, hnsw: HnswParams) -> BuildResult:
        """Build HNSW on a copy in a child process and swap it in (retriever/store/hnsw.py)."""
        return await build_while_serving(self, hnsw)

    async def drop(self) -> None:
        await self.close()
        await asyncio.to_thread(shutil.rmtree, self.shard_dir, True)

    def versions(self) -> Versions:
        from retriever.reindex import EdgeVersions

        return EdgeVersions(self.path, self.collection)

    async def export_points(self, batch: int = 256) -> AsyncIterator[list[PointRecord]]:
        offset: str | None = None
        while self._shard is not None:
            request = qe.ScrollRequest(offset=offset, limit=max(1, batch), filter=None,
                                       with_payload=True, with_vector=True)
            # converted in the worker thread too: ~70 µs a point at 512-d, which would stall the event loop
            points, next_offset = await self._call(_scroll_exported, self._shard, request)
            if points:
                yield points
            if next_offset is None or not points:
                return
            offset = str(next_offset)

    async def import_points(self, points: list[PointRecord]) -> int:
        await self.upsert(points)
        return len(points)

    @asynccontextmanager
    async def frozen(self) -> AsyncIterator[None]:
        async with self._writes:  # what snapshot_to holds while it copies the shard
            yield

    async def flush(self) -> None:
        """Make the shard's files hold every write so far (inside ``frozen``: a copy of them is then whole)."""
        await self._call(self._require().flush)

    async def run_on_shard(self, fn: Callable[[qe.EdgeShard], T]) -> T:
        """``fn(shard)`` on a worker thread: a read the store has no method for (a backup's payload scan)."""
        return await self._call(fn, self._require())

    # --- writes --------------------------------------------------------------------------------
    def _require(self) -> qe.EdgeShard:
        if self._shard is None:
            raise NotFound(f"collection {self.collection!r} does not exist in {self.path}; ingest first")
        return self._shard

    async def upsert(self, points: list[PointRecord]) -> None:
        if not points:
            return
        self._require()
        passage = self._stored_passage()
        check_vectors(points, self._meta.get("dim") if self._meta else None, passage.dim if passage else None)
        check_sparse(points)
        if not self._lexical and not self._warned_no_lexical and any(p.lexical for p in points):
            self._warned_no_lexical = True
            log.warning("embedded store %s predates the lexical vector: BM25 vectors are not stored "
                        "(dense search only); reindex to add them", self.shard_dir)
        lexical = self._lexical
        await self._write(lambda target: _upsert_sync(target, points, lexical), len(points))

    async def delete(self, ids: list[str]) -> int:
        if not ids or self._shard is None:
            return 0
        present = await self.existing_ids(ids)
        if present:
            operation = qe.UpdateOperation.delete_points(sorted(present))  # reusable: replayed as is
            await self._write(lambda target: target.update(operation))
        return len(present)

    async def delete_by_filter(self, filters: SearchFilters) -> int:
        edge_filter = build_filter(filters)
        if edge_filter is None:
            raise InvalidInput("delete_by_filter needs at least one filter (source, tags, kind or content_hash)")
        if self._shard is None:
            return 0
        matched = await self.count(filters)
        if matched:
            operation = qe.UpdateOperation.delete_points_by_filter(edge_filter)
            await self._write(lambda target: target.update(operation))
        return matched

    # --- reads ---------------------------------------------------------------------------------
    async def search(
        self, vector_name: str, vector: list[float], limit: int, filters: SearchFilters | None = None,
        *, exact: bool = False,
    ) -> list[ScoredPoint]:
        if vector_name not in VECTOR_NAMES and vector_name != PASSAGE_VECTOR:
            raise InvalidInput(f"unknown vector {vector_name!r}; expected one of {VECTOR_NAMES}")
        if self._shard is None or limit <= 0 or (vector_name == PASSAGE_VECTOR and not self._passage_vector):
            return []
        # Without an HNSW segment (no `vlmrag optimize` yet) both are the same exact scan.
        params = qe.SearchParams(exact=True) if exact else (
            qe.SearchParams(hnsw_ef=max(self.hnsw_ef or self._auto_ef, limit)))
        request = qe.QueryRequest(
            limit=limit, query=qe.Query.Nearest(_vector(vector), using=vector_name),
            filter=build_filter(filters), with_payload=True, with_vector=False, params=params,
        )
        hits = self._call_inline(self._shard.query, request)
        return [ScoredPoint(str(h.id), float(h.score), SnippetPayload.from_dict(h.payload or {})) for h in hits]

    async def search_lexical(
        self, query: SparseVector, limit: int, filters: SearchFilters | None = None
    ) -> list[ScoredPoint]:
        if self._shard is None or limit <= 0 or not query or not self._lexical:
            return []
        check_sparse([PointRecord("query", {}, SnippetPayload(kind="text"), query)])
        request = qe.QueryRequest(
            limit=limit, query=qe.Query.Nearest(qe.SparseVector(list(query.indices), list(query.values)),
                                                using=LEXICAL_VECTOR),
            filter=build_filter(filters), with_payload=True, with_vector=False,
        )
        hits = self._call_inline(self._shard.query, request)
        return lexical_order(
            [ScoredPoint(str(h.id), float(h.score), SnippetPayload.from_dict(h.payload or {})) for h in hits]
        )

    async def has_lexical(self) -> bool:
        return self._shard is not None and self._lexical

    async def retrieve(self, ids: list[str]) -> list[StoredPoint]:
        if not ids or self._shard is None:
            return []
        wanted = [normalize_id(i) for i in ids]
        records = await self._call(self._shard.retrieve, wanted, True, False)
        by_id = {str(r.id): r for r in records}
        # Keep the caller's order; missing ids are simply absent.
        return [StoredPoint(i, SnippetPayload.from_dict(by_id[i].payload or {})) for i in wanted if i in by_id]

    async def existing_ids(self, ids: list[str]) -> set[str]:
        if not ids or self._shard is None:
            return set()
        wanted = [normalize_id(i) for i in ids]
        records = await self._call(self._shard.retrieve, wanted, False, False)
        return {str(r.id) for r in records}

    async def count(self, filters: SearchFilters | None = None) -> int:
        if self._shard is None:
            return 0
        return int(await self._call(self._shard.count, qe.CountRequest(exact=True, filter=build_filter(filters))))

    async def facet_counts(self, field: str) -> dict[str, int]:
        if field not in KEYWORD_FIELDS:
            raise InvalidInput(f"facet field must be one of {KEYWORD_FIELDS}, not {field!r}")
        if self._shard is None:
            return {}
        response = await self._call(self._shard.facet, qe.FacetRequest(field, limit=_FACET_LIMIT, exact=True))
        # Empty strings (no source) are not a facet value; the scroll fallback of RemoteStore agrees.
        # Edge's facet index keeps a value with count 0 after its last point is deleted: drop it.
        return {str(hit.value): int(hit.count) for hit in response if hit.value != "" and hit.count > 0}

    async def scroll(
        self, limit: int = 100, offset: str | None = None, filters: SearchFilters | None = None
    ) -> tuple[list[StoredPoint], str | None]:
        if self._shard is None:
            return [], None
        request = qe.ScrollRequest(
            offset=normalize_id(offset) if offset else None, limit=limit, filter=build_filter(filters),
            with_payload=True, with_vector=False,
        )
        records, next_offset = await self._call(self._shard.scroll, request)
        points = [StoredPoint(str(r.id), SnippetPayload.from_dict(r.payload or {})) for r in records]
        return points, None if next_offset is None else str(next_offset)
