"""Restore one archived collection into a new version and switch to it atomically.

The served version is never written: the archive goes into ``<collection>__vN`` (N one past every
version there is, at least 2, so a half-restored version is never the plain name a store opens by
default), its count is checked, and only then does the collection switch to it (the ``__current``
symlink of the embedded store, the alias of a Qdrant server: retriever/reindex.py). A failure or a
kill before the switch leaves the served version as it was; the next restore takes the next number.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retriever.backup.archive import ArchiveReader
from retriever.backup.collection import EDGE_SHARD, Progress, _refs, import_collection, restore_kb_blobs
from retriever.backup.shard import _blob_keys, archived_points, import_from_shard, place_edge_shard
from retriever.blobs import BlobStore
from retriever.errors import Conflict, StoreUnavailable
from retriever.reindex import EdgeVersions, ReindexResult, Versions, _PointRebuilder
from retriever.store.base import VectorStore, version_name, version_number
from retriever.types import PassageSpec, StoredPoint

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RestoredCollection:
    kb: str
    collection: str
    version: str
    previous: str | None
    points: int
    dropped: list[str] = field(default_factory=list)
    skipped: int = 0  # --reembed: points with neither a readable image nor text


async def reembed_collection(
    readers: list[ArchiveReader], kb: str, target: VectorStore, blobs: BlobStore, rebuilder: _PointRebuilder,
    scratch: Path, progress: Progress | None = None,
) -> tuple[int, int]:
    """Blobs, then every archived point of ``kb`` re-embedded by ``rebuilder`` into ``target``; (written, skipped).

    ``rebuilder.blobs`` must be ``blobs`` (the images are read back from where they were restored).
    """
    reader = readers[0]
    entry = reader.manifest["kbs"][kb]
    if entry.get("method") == EDGE_SHARD:
        wanted = await asyncio.to_thread(_blob_keys, reader, kb)
    else:
        wanted = await asyncio.to_thread(lambda: {key for refs in _refs(reader, kb) for key in refs})
    await restore_kb_blobs(readers, kb, blobs, wanted, set(entry.get("missing_blobs") or []), progress)
    report = ReindexResult(old=entry.get("collection"), new=getattr(target, "collection", ""),
                           embedder=rebuilder.embedder.identity)
    total, written, seen = int(entry.get("points", 0)), 0, 0
    async for batch in archived_points(reader, kb, scratch):
        page = [StoredPoint(p.id, p.payload) for p in batch]
        points = await asyncio.to_thread(rebuilder.rebuild, page, report)
        await target.upsert(points)
        written, seen = written + len(points), seen + len(page)
        if progress:
            progress(f"{kb}: re-embedded", seen, total)
    for line in report.skipped:
        log.warning("restore --reembed of %s: left out %s", kb, line)
    return written, seen - written


async def served_count(versions: Versions) -> tuple[str | None, int]:
    """The served version and its point count (opening it: a store held by a server is refused here)."""
    current = await versions.current()
    if current is None:
        return None, 0
    store = await versions.open(current)
    try:
        return current, await store.count()
    finally:
        await versions.release(store)


async def next_version(versions: Versions) -> str:
    numbers = [version_number(versions.collection, n) or 1 for n in await versions.versions()]
    current = await versions.current()
    if current is not None:
        numbers.append(version_number(versions.collection, current) or 1)
    return version_name(versions.collection, max([1, *numbers]) + 1)


def archived_passage(entry: dict[str, Any]) -> PassageSpec | None:
    """The text embedder of an archived collection's ``passage`` vector (None: it had none)."""
    passage = entry.get("passage")
    return PassageSpec(int(passage["dim"]), str(passage["embedder_id"]), bool(passage.get("sections"))) if passage else None


async def restore_collection(
    readers: list[ArchiveReader], kb: str, versions: Versions, blobs: BlobStore, *, replace: bool = False,
    progress: Progress | None = None, on_batch: Callable[[int], None] | None = None, scratch: Path | None = None,
    rebuilder: _PointRebuilder | None = None,
) -> RestoredCollection:
    """Archived ``kb`` into a new version of ``versions``' collection, then switch (see the module doc).

    A served version with points is replaced only with ``replace`` (its version is dropped after the
    switch); otherwise ``Conflict``. An ``edge-shard`` KB goes into the embedded store as its files
    (retriever/backup/shard.py), into a Qdrant server point by point (extracted under ``scratch``).
    ``rebuilder`` (``--reembed``): the points get vectors of its model instead, from their stored text
    and blobs (retriever/reindex.py); a point with neither is left out (``skipped``).
    """
    entry = readers[0].manifest["kbs"][kb]
    previous, count = await served_count(versions)
    if count and not replace:
        raise Conflict(f"knowledge base {kb!r} ({versions.collection}) holds {count} snippets; restore with "
                       "--replace to replace it, or --as NEW into a new knowledge base; nothing was changed")
    new = await next_version(versions)
    native = entry.get("method") == EDGE_SHARD
    target: VectorStore | None = None
    skipped = 0
    try:
        if rebuilder is not None:  # --reembed: vectors of the configured model from the stored text and blobs
            target = await versions.open(new)
            await target.ensure_collection(rebuilder.embedder.dim, rebuilder.embedder.identity,
                                           passage=rebuilder.text_embedder.spec if rebuilder.text_embedder else None)
            written, skipped = await reembed_collection(readers, kb, target, blobs, rebuilder,
                                                        scratch or Path(tempfile.gettempdir()), progress)
        elif native and isinstance(versions, EdgeVersions):  # the shard's files as they were: nothing re-imported
            await place_edge_shard(readers, kb, versions.path, new, blobs, progress)
            target = await versions.open(new)
            if await target.embedder_id() != entry.get("embedder_id"):
                raise StoreUnavailable(f"the restored shard of {kb} names embedder {await target.embedder_id()}, "
                                       f"its manifest {entry.get('embedder_id')}; nothing was switched")
            written = await target.count()
        else:
            target = await versions.open(new)
            await target.ensure_collection(int(entry["dim"]), str(entry["embedder_id"]),
                                           passage=archived_passage(entry))
            if native:  # into a Qdrant server: the migration path, every point streamed out of the shard
                written = await import_from_shard(readers, kb, target, blobs, scratch or Path(tempfile.gettempdir()),
                                                  progress)
            else:
                written = await import_collection(readers, kb, target, blobs, progress, on_batch)
        stored = await target.count()
        if stored + skipped != int(entry["points"]) or written != stored:
            raise StoreUnavailable(f"restoring {kb} wrote {stored} of {entry['points']} points; nothing was switched")
        await versions.switch(new)
    except BaseException:
        if target is not None:
            await versions.release(target)
        try:
            await versions.drop(new)
        except Exception:  # the served version is untouched; the leftover only costs disk
            log.warning("could not remove the unfinished version %s", new, exc_info=True)
        raise
    await versions.release(target)
    log.info("restored %s: %d points into %s (was %s)", kb, written, new, previous)
    result = RestoredCollection(kb, versions.collection, new, previous, written, skipped=skipped)
    if replace and previous is not None and previous != new:
        await versions.drop(previous)
        result.dropped.append(previous)
    return result
