"""The embedded store's collections archived as their Edge shard's files (``"method": "edge-shard"``).

Qdrant Edge 0.9.0 cannot write a snapshot, and exporting points through it turns every vector into
Python floats (~70 µs a point at 512-d, most of a logical backup). So a backup of an ``EdgeStore``
takes the shard itself, the way an HNSW build beside the server does (retriever/store/hnsw.py):

* **Backup** (``stage_edge_collection``): the blob store's deletes held, then inside ``store.frozen()``
  (writes wait, reads go on) flush the shard, reserve a region of the archive for its files and copy
  them into it on one thread (``members.ReservedFiles``: ``copy_file_range``, sha256 from an mmap;
  ~0.5 s at 100k points), while a second thread (``archive.run_niced``: low priority inside the server)
  archives every blob the local blob store holds at that moment (``LocalBlobStore.keys``: a frozen
  point's blobs were put before it, so they are all there; a blob no point references is archived too,
  harmless). Writes go on once the shard is copied; the held deletes happen when the archive is done.
  A blob store other than local files: the blob keys the points reference are read from two payload
  fields (no vectors) and the blobs copied while frozen.
* **Restore into the embedded store** (``place_edge_shard``): after every checksum was verified, the
  blobs are written, the shard files extracted into ``.<collection>__vN.restoring-<hex>``, synced and
  renamed to ``<collection>__vN``; the caller then opens it, checks its count and switches
  ``__current``. A kill before the switch leaves the served version as it was (what it left is removed
  by a restore an hour later; a version renamed but never switched to stays, unserved, until old
  versions are dropped).
* **Restore into a Qdrant server** (``import_from_shard``, the migration path): the shard is extracted
  into a scratch folder, opened with Edge there (a private copy) and its points streamed to the server.
  That is the slow path (every vector through Python), fine for a one-time migration.

``archived_points`` reads any archived collection (either method) as point batches: the remote restore
and ``--reembed`` use it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import ExitStack
from pathlib import Path, PurePosixPath
from typing import Any

import qdrant_edge as qe

from retriever.backup.archive import ArchiveReader, ArchiveWriter, bad_archive, run_niced
from retriever.backup.collection import (
    BATCH,
    BLOB_KEYS,
    EDGE_SHARD,
    Progress,
    StagedCollection,
    _stage_blobs,
    member_prefix,
    read_points,
    remove_stale,
    restore_kb_blobs,
)
from retriever.backup.members import ReservedFiles, add_blob_files
from retriever.blobs import BlobStore, LocalBlobStore, validate_key
from retriever.errors import InvalidInput, StoreUnavailable
from retriever.store.base import PASSAGE_VECTOR, VectorStore
from retriever.store.edge import EdgeStore
from retriever.store.hnsw import SHARD_CONFIG_FILE
from retriever.types import PointRecord

log = logging.getLogger(__name__)
SHARD = "shard"
_REFS = ["image_ref", "thumb_ref"]


def shard_prefix(kb: str) -> str:
    return f"{member_prefix(kb)}{SHARD}/"


def _shard_files(root: Path) -> list[str]:
    """Every regular file under ``root``, relative, sorted (Edge keeps no links in a shard)."""
    files = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                raise StoreUnavailable(f"embedded store shard {root} holds {path}, which is not a plain file; "
                                       "cannot back it up as a shard (use --format logical)")
            files.append(path.relative_to(root).as_posix())
    return sorted(files)


def _blob_refs(shard: qe.EdgeShard) -> tuple[int, set[str]]:
    """(points, blob keys they reference), reading only the two payload fields (blocking)."""
    refs: set[str] = set()
    points = 0
    offset: Any = None
    while True:
        request = qe.ScrollRequest(offset=offset, limit=10_000, with_payload=qe.PayloadSelector.Include(_REFS),
                                   with_vector=False)
        records, offset = shard.scroll(request)
        points += len(records)
        for record in records:
            payload = record.payload or {}
            refs.update(ref for ref in (payload.get("image_ref"), payload.get("thumb_ref")) if ref)
        if offset is None or not records:
            return points, refs


def _vector_dims(shard_dir: Path) -> dict[str, int]:
    config = json.loads((shard_dir / SHARD_CONFIG_FILE).read_text(encoding="utf-8"))
    return {name: int(v["size"]) for name, v in (config.get("vectors") or {}).items()}


async def stage_edge_collection(
    kb: str, store: EdgeStore, blobs: BlobStore, folder: Path, *, writer: ArchiveWriter, holds: ExitStack,
    collection: str = "", base_blobs: set[str] | None = None, progress: Progress | None = None, nice: int = 10,
) -> StagedCollection:
    """``store``'s shard into ``writer`` and its blobs archived or staged, at one moment (see the module doc).

    Local blobs: ``holds`` gets the blob store's hold on deletes (the caller leaves it once the archive is
    written); every blob the store holds while the shard is frozen is archived, on a thread at ``nice``,
    beside the shard's copy. Other blob stores: the keys the points reference are read and copied into
    ``folder`` while frozen, and archived by ``write_collection``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    skip = base_blobs or set()
    local = blobs if isinstance(blobs, LocalBlobStore) else None
    if local is not None:
        holds.enter_context(local.deletes_held())  # before the freeze: no blob of a frozen point goes away
    blob_writes: asyncio.Future[list[str]] | None = None
    async with store.frozen():
        await store.flush()
        count = await store.count()
        staged = StagedCollection(kb, collection, await store.embedder_id(), None, folder,
                                  passage=await store.passage_spec(), method=EDGE_SHARD)
        shard_dir = store.shard_dir
        staged.shard_files = await asyncio.to_thread(_shard_files, shard_dir)
        staged.vectors = _vector_dims(shard_dir)
        region = await asyncio.to_thread(
            ReservedFiles, writer, [(shard_prefix(kb) + rel, shard_dir / rel) for rel in staged.shard_files])
        if local is not None:
            # a frozen point's blobs were put before it: they are here now (and stay: deletes are held)
            keys = await asyncio.to_thread(local.keys)
            todo = [k for k in keys if k not in skip]
            staged.blob_keys, staged.blobs_in_base = keys, len(keys) - len(todo)
            blob_writes = asyncio.ensure_future(run_niced(
                add_blob_files, writer, f"{member_prefix(kb)}blobs/", str(local.root), todo, nice=nice))
        copy = asyncio.ensure_future(asyncio.to_thread(region.copy))
        try:
            if local is None:  # the keys the points reference, read beside the copy
                scanned, refs = await store.run_on_shard(_blob_refs)
                if scanned != count:
                    raise StoreUnavailable(f"{collection or kb} changed during the backup ({scanned} of {count} "
                                           "points read); try again")
                staged.blob_keys = sorted(refs)
                await asyncio.to_thread(_stage_blobs, staged, blobs, staged.blob_keys, skip, progress)
            await asyncio.shield(copy)
        except BaseException:  # the threads write on: wait for them (the caller aborts the archive)
            await asyncio.gather(copy, *([blob_writes] if blob_writes else []), return_exceptions=True)
            raise
    if blob_writes is not None:  # writes go on meanwhile
        try:
            missing = await asyncio.shield(blob_writes)
        except asyncio.CancelledError:
            await asyncio.gather(blob_writes, return_exceptions=True)
            raise
        _note_missing(staged, todo, missing)
    if progress:
        progress(f"{kb}: points", count, count)
    staged.points = count
    await asyncio.to_thread((folder / BLOB_KEYS).write_text, "".join(f"{k}\n" for k in staged.blob_keys), "utf-8")
    dims = {dim for name, dim in staged.vectors.items() if name != PASSAGE_VECTOR}
    staged.dim = dims.pop() if len(dims) == 1 else (max(dims) if dims else None)
    return staged


def _note_missing(staged: StagedCollection, written: list[str], missing: list[str]) -> None:
    """The archived blobs in ``staged`` (their count is the manifest's); the vanished ones noted."""
    staged.blobs_archived = len(written) - len(missing)
    if missing:  # removed by something other than this process's blob store: cannot be held
        log.warning("backup of %s: %d blobs vanished while they were archived (first %s)", staged.kb,
                    len(missing), missing[0])
        staged.missing_blobs.extend(missing)
        gone = set(missing)
        staged.blob_keys = [k for k in staged.blob_keys if k not in gone]


# --- restore -----------------------------------------------------------------------------------------
def _blob_keys(reader: ArchiveReader, kb: str) -> set[str]:
    keys = set()
    for line in reader.read(member_prefix(kb) + BLOB_KEYS).decode("utf-8").splitlines():
        if line.strip():
            try:
                keys.add(validate_key(line.strip()))
            except InvalidInput as exc:
                raise bad_archive(reader.path, f"lists an invalid blob key of KB {kb} ({exc.message})") from exc
    return keys


def extract_shard(reader: ArchiveReader, kb: str, dest: Path) -> int:
    """The archived shard files of ``kb`` into the new directory ``dest`` (blocking); returns the files."""
    prefix = shard_prefix(kb)
    names = reader.names(prefix)
    if not any(PurePosixPath(n).name == SHARD_CONFIG_FILE for n in names):
        raise bad_archive(reader.path, f"holds no shard of KB {kb} (no {SHARD_CONFIG_FILE})")
    dest.mkdir(parents=True)
    for name in names:
        rel = PurePosixPath(name[len(prefix):])
        if rel.is_absolute() or any(part in ("", ".", "..") for part in rel.parts):
            raise bad_archive(reader.path, f"has a shard member outside the shard: {name}")
        target = dest.joinpath(*rel.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        reader.extract(name, target)
    return len(names)


async def _restore_blobs(readers: list[ArchiveReader], kb: str, blobs: BlobStore, progress: Progress | None) -> None:
    reader = readers[0]
    wanted = await asyncio.to_thread(_blob_keys, reader, kb)
    missing = set(reader.manifest["kbs"][kb].get("missing_blobs") or [])
    await restore_kb_blobs(readers, kb, blobs, wanted, missing, progress)


async def place_edge_shard(
    readers: list[ArchiveReader], kb: str, path: Path, name: str, blobs: BlobStore, progress: Progress | None = None,
) -> None:
    """Blobs, then the archived shard of ``kb`` as the (unserved) shard directory ``path/name``."""
    await _restore_blobs(readers, kb, blobs, progress)
    path.mkdir(parents=True, exist_ok=True)
    remove_stale(path, ".*.restoring-*")
    work = path / f".{name}.restoring-{uuid.uuid4().hex[:8]}"
    try:
        await asyncio.to_thread(extract_shard, readers[0], kb, work)
        await asyncio.to_thread(os.sync)  # the files durable before the rename names them a version
        await asyncio.to_thread(os.rename, work, path / name)
    except BaseException:
        await asyncio.to_thread(shutil.rmtree, work, True)
        raise


async def archived_points(reader: ArchiveReader, kb: str, scratch: Path) -> AsyncIterator[list[PointRecord]]:
    """Every archived point of ``kb`` with its vectors, ``BATCH`` at a time, whatever the method."""
    if reader.manifest["kbs"][kb].get("method") != EDGE_SHARD:
        points = read_points(reader, kb)
        while (batch := await asyncio.to_thread(next, points, None)) is not None:
            yield batch
        return
    scratch.mkdir(parents=True, exist_ok=True)
    work = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="restore-", dir=scratch))
    try:
        await asyncio.to_thread(extract_shard, reader, kb, work / SHARD)
        source = EdgeStore(work, SHARD)  # a private copy: nothing else opens it
        await source.open()
        try:
            async for batch in source.export_points(BATCH):
                yield batch
        finally:
            await source.close()
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)


async def import_from_shard(
    readers: list[ArchiveReader], kb: str, target: VectorStore, blobs: BlobStore, scratch: Path,
    progress: Progress | None = None,
) -> int:
    """Blobs, then the points of the archived shard of ``kb``, into ``target`` (empty, ensured)."""
    await _restore_blobs(readers, kb, blobs, progress)
    total, written = int(readers[0].manifest["kbs"][kb].get("points", 0)), 0
    async for batch in archived_points(readers[0], kb, scratch):
        written += await target.import_points(batch)
        if progress:
            progress(f"{kb}: points", written, total)
    return written
