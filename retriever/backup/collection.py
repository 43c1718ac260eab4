"""One collection in a backup archive: its points (payloads, every dense and sparse vector) and its blobs.

``stage_collection`` takes the point-in-time view: inside ``store.frozen()`` (writes wait, reads go
on) it counts, exports every point and stages every blob the points reference (a hard link for a
local blob store, so a delete after the freeze cannot take the bytes away; a copy otherwise), then
lets writes go on; the archive is written from the staging folder afterwards. Dense vectors are kept
by name, whatever names the collection has (float16: what the embedded store keeps anyway).

``import_collection`` writes an archived collection into an empty, ensured store (a new version):
blobs first (content-addressed: their key is checked against their bytes), then the points.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from retriever.backup.archive import ArchiveReader, ArchiveWriter, bad_archive
from retriever.blobs import BlobStore, LocalBlobStore, blob_key, validate_key
from retriever.errors import NotFound, StoreUnavailable
from retriever.store.base import PASSAGE_VECTOR, VectorStore
from retriever.types import PassageSpec, PointRecord, SnippetPayload, SparseVector, VectorValue

log = logging.getLogger(__name__)

VECTOR_DTYPE = np.dtype("<f2")
#: points per export / import batch
BATCH = 512
#: (phase, done, total)
Progress = Callable[[str, int, int], None]
#: the ``method`` of a KB archived as its Edge shard's files (retriever/backup/shard.py); else "logical"
EDGE_SHARD = "edge-shard"
LOGICAL = "logical"
#: edge-shard: the blob keys of the KB at the backup (a superset of its points' with local blobs), one a line
BLOB_KEYS = "blob-keys.txt"


def member_prefix(kb: str) -> str:
    return f"kbs/{kb}/"


def point_blobs(payload: dict[str, Any]) -> list[str]:
    """The blob keys a stored payload references (the original image and its thumbnail)."""
    return [ref for ref in (payload.get("image_ref"), payload.get("thumb_ref")) if ref]


@dataclass(slots=True)
class StagedCollection:
    """A collection exported to a staging folder, ready to be written into an archive."""

    kb: str
    collection: str
    embedder_id: str | None
    dim: int | None
    folder: Path
    points: int = 0
    vectors: dict[str, int] = field(default_factory=dict)  # name -> dimension
    vector_rows: dict[str, int] = field(default_factory=dict)
    sparse: dict[str, int] = field(default_factory=dict)  # name -> points that have it
    blobs: dict[str, Path] = field(default_factory=dict)  # key -> staged file
    blobs_in_base: int = 0
    missing_blobs: list[str] = field(default_factory=list)
    passage: PassageSpec | None = None  # the text embedder of the ``passage`` vector, where it has one
    method: str = LOGICAL  # or EDGE_SHARD (retriever/backup/shard.py)
    shard_files: list[str] = field(default_factory=list)  # edge-shard: paths under folder/"shard"
    blob_keys: list[str] = field(default_factory=list)  # edge-shard: what blob-keys.txt lists
    blobs_archived: int | None = None  # edge-shard, local blobs: written beside the shard (``blobs`` empty)

    def entry(self) -> dict[str, Any]:
        """The manifest's entry of this collection."""
        return {
            "method": self.method, "collection": self.collection, "embedder_id": self.embedder_id, "dim": self.dim,
            "points": self.points, "vectors": dict(sorted(self.vectors.items())),
            "vector_rows": dict(sorted(self.vector_rows.items())), "sparse": dict(sorted(self.sparse.items())),
            "blobs": len(self.blobs) if self.blobs_archived is None else self.blobs_archived,
            "blobs_in_base": self.blobs_in_base,
            "missing_blobs": sorted(self.missing_blobs),
            "passage": {"embedder_id": self.passage.embedder_id, "dim": self.passage.dim,
                        "sections": self.passage.sections} if self.passage else None,
        }


def _stage_blob(blobs: BlobStore, key: str, dest: Path) -> bool:
    """Link (or copy) blob ``key`` to ``dest``; False when the blob store does not have it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    source = blobs.path_for(key)
    if source is not None:
        try:
            os.link(source, dest)  # blobs are never rewritten in place: the link keeps these bytes
            return True
        except FileNotFoundError:
            return False
        except OSError:  # another file system: copy
            try:
                shutil.copyfile(source, dest)
                return True
            except FileNotFoundError:
                return False
    try:
        dest.write_bytes(blobs.get(key))
    except NotFound:
        return False
    return True


class _PointsWriter:
    """points.jsonl and one .f16 file per dense vector name, appended batch by batch (blocking)."""

    def __init__(self, staged: StagedCollection) -> None:
        self.staged = staged
        (staged.folder / "vectors").mkdir(parents=True, exist_ok=True)
        self.lines = open(staged.folder / "points.jsonl", "w", encoding="utf-8")  # noqa: SIM115
        self.files: dict[str, IO[bytes]] = {}

    def write(self, batch: list[PointRecord]) -> list[str]:
        """Append a batch; returns the blob keys its points reference."""
        staged, refs = self.staged, []
        rows: dict[str, list[Any]] = {}
        out: list[str] = []
        for point in batch:
            payload = point.payload.to_dict()
            names = sorted(point.vectors)
            multi: dict[str, int] = {}  # a multi-vector's row count (``passage`` with sections)
            for name in names:
                value = point.vectors[name]
                if value and isinstance(value[0], (list, tuple)):
                    rows.setdefault(name, []).extend(value)
                    multi[name] = len(value)
                else:
                    rows.setdefault(name, []).append(value)
            sparse = {}
            if point.lexical:
                sparse["lexical"] = [list(point.lexical.indices), list(point.lexical.values)]
                staged.sparse["lexical"] = staged.sparse.get("lexical", 0) + 1
            line = {"id": point.id, "payload": payload, "vectors": names, "sparse": sparse}
            if multi:
                line["rows"] = multi
            out.append(json.dumps(line, ensure_ascii=False, separators=(",", ":")))
            refs.extend(point_blobs(payload))
        self.lines.write("\n".join(out) + "\n")
        for name, values in rows.items():
            matrix = np.asarray(values, dtype=np.float32)
            dim = staged.vectors.setdefault(name, int(matrix.shape[1]))
            if matrix.shape[1] != dim:
                raise StoreUnavailable(f"vector {name!r} of {staged.collection} has {matrix.shape[1]} and {dim} "
                                       "dimensions; cannot back it up")
            if name not in self.files:
                self.files[name] = open(staged.folder / "vectors" / f"{name}.f16", "wb")  # noqa: SIM115
            self.files[name].write(matrix.astype(VECTOR_DTYPE).tobytes())
            staged.vector_rows[name] = staged.vector_rows.get(name, 0) + len(values)
        staged.points += len(batch)
        return refs

    def close(self) -> None:
        self.lines.close()
        for handle in self.files.values():
            handle.close()


async def stage_collection(
    kb: str, store: VectorStore, blobs: BlobStore, folder: Path, *, collection: str = "",
    base_blobs: set[str] | None = None, progress: Progress | None = None,
) -> StagedCollection:
    """Export ``store`` and its blobs at one moment into ``folder`` (see the module doc).

    ``base_blobs``: keys an earlier archive holds for this KB (``--incremental``): not staged again.
    """
    folder.mkdir(parents=True, exist_ok=True)
    async with store.frozen():
        count = await store.count()
        staged = StagedCollection(kb, collection, await store.embedder_id(), None, folder,
                                  passage=await store.passage_spec())
        writer = _PointsWriter(staged)
        wanted: set[str] = set()
        try:
            async for batch in store.export_points(BATCH):
                wanted.update(await asyncio.to_thread(writer.write, batch))
                if progress:
                    progress(f"{kb}: points", staged.points, count)
        finally:
            writer.close()
        if staged.points != count:  # the collection went away under us (a KB deleted meanwhile)
            raise StoreUnavailable(f"{collection or kb} changed during the backup ({staged.points} of {count} "
                                   "points read); try again")
        skip = base_blobs or set()
        await asyncio.to_thread(_stage_blobs, staged, blobs, sorted(wanted), skip, progress)
    dims = {dim for name, dim in staged.vectors.items() if name != PASSAGE_VECTOR}  # the CLIP dimension
    staged.dim = dims.pop() if len(dims) == 1 else (max(dims) if dims else None)
    return staged


def _stage_blobs(staged: StagedCollection, blobs: BlobStore, keys: list[str], skip: set[str],
                 progress: Progress | None) -> None:
    for done, key in enumerate(keys, 1):
        if key in skip:
            staged.blobs_in_base += 1
            continue
        dest = staged.folder / "blobs" / validate_key(key)
        if _stage_blob(blobs, key, dest):
            staged.blobs[key] = dest
        else:
            log.warning("backup of %s: blob %s of a point is missing from %s", staged.kb, key,
                        getattr(blobs, "description", "the blob store"))
            staged.missing_blobs.append(key)
        if progress and done % 1000 == 0:
            progress(f"{staged.kb}: blobs", done, len(keys))


def write_collection(writer: ArchiveWriter, staged: StagedCollection) -> None:
    """Add a staged collection's files to the archive (blocking)."""
    prefix = member_prefix(staged.kb)
    if staged.method == EDGE_SHARD:  # its shard files were written while frozen (retriever/backup/shard.py)
        writer.add_file(prefix + BLOB_KEYS, staged.folder / BLOB_KEYS)
    else:
        writer.add_file(prefix + "points.jsonl", staged.folder / "points.jsonl")
        for name in sorted(staged.vectors):
            writer.add_file(f"{prefix}vectors/{name}.f16", staged.folder / "vectors" / f"{name}.f16")
    for key, path in sorted(staged.blobs.items()):
        try:
            writer.add_file(f"{prefix}blobs/{key}", path)
        except FileNotFoundError:  # archived from the blob store itself: missing there before the backup
            log.warning("backup of %s: blob %s of a point is missing", staged.kb, key)
            del staged.blobs[key]
            staged.missing_blobs.append(key)


# --- restore ---------------------------------------------------------------------------------------
def archived_blobs(reader: ArchiveReader, kb: str) -> set[str]:
    prefix = member_prefix(kb) + "blobs/"
    return {name[len(prefix):] for name in reader.names(prefix)}


def read_points(reader: ArchiveReader, kb: str) -> Iterator[list[PointRecord]]:
    """The archived points of ``kb``, ``BATCH`` at a time, with their vectors (blocking)."""
    entry = reader.manifest["kbs"][kb]
    prefix = member_prefix(kb)
    dims: dict[str, int] = {k: int(v) for k, v in entry.get("vectors", {}).items()}
    streams = {name: reader.open(f"{prefix}vectors/{name}.f16") for name in dims}
    batch: list[PointRecord] = []
    with reader.open(prefix + "points.jsonl") as lines:
        for raw in lines:
            if not raw.strip():
                continue
            try:
                item = json.loads(raw)
                vectors: dict[str, VectorValue] = {}
                multi = item.get("rows") or {}  # a multi-vector's row count
                for name in item["vectors"]:
                    count = int(multi.get(name, 1))
                    data = streams[name].read(count * dims[name] * VECTOR_DTYPE.itemsize)
                    if len(data) != count * dims[name] * VECTOR_DTYPE.itemsize:
                        raise ValueError(f"vector file {name} ends early")
                    matrix = np.frombuffer(data, dtype=VECTOR_DTYPE).astype(np.float32)
                    vectors[name] = matrix.reshape(count, dims[name]).tolist() if name in multi else matrix.tolist()
                lexical = item.get("sparse", {}).get("lexical")
                sparse = SparseVector([int(i) for i in lexical[0]], [float(v) for v in lexical[1]]) if lexical else None
                batch.append(PointRecord(str(item["id"]), vectors, SnippetPayload.from_dict(item["payload"]), sparse))
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                raise bad_archive(reader.path, f"has an unreadable point in {prefix}points.jsonl ({exc})") from exc
            if len(batch) >= BATCH:
                yield batch
                batch = []
    if batch:
        yield batch


def restore_blobs(readers: list[ArchiveReader], kb: str, blobs: BlobStore, wanted: set[str],
                  progress: Progress | None = None) -> int:
    """Put every ``wanted`` blob from the archive (or its bases, for an incremental one) into ``blobs``.

    Read here in order, written by four threads (creating a file is mostly waiting on the file system);
    each key is checked against its bytes.
    """
    if isinstance(blobs, LocalBlobStore):
        return _restore_local_blobs(readers, kb, blobs, wanted, progress)
    return _write_blobs(readers, kb, wanted, lambda key, data: blobs.put(data, _suffix(key)) == key,
                        lambda key: False, progress)


def _write_blobs(readers: list[ArchiveReader], kb: str, wanted: set[str], write: Callable[[str, bytes], bool],
                 present: Callable[[str], bool], progress: Progress | None) -> int:
    """Each ``wanted`` blob the archives hold and ``present`` denies, read in order and ``write``-n by four
    threads (False: its bytes do not match its key, the archive is corrupted); returns how many."""
    written = 0
    pending: deque[tuple[str, ArchiveReader, Future[bool]]] = deque()

    def settle(limit: int) -> None:
        while len(pending) > limit:
            key, source, future = pending.popleft()
            if not future.result():
                raise bad_archive(source.path, f"holds blob {key} whose bytes do not match its key (corrupted)")

    with ThreadPoolExecutor(4, thread_name_prefix="vlmrag-restore-blobs") as pool:
        for done, key in enumerate(sorted(wanted), 1):
            name = f"{member_prefix(kb)}blobs/{key}"
            source = next((r for r in readers if name in r.members), None)
            if source is None or present(key):
                continue  # missing at backup time (checked by the caller), or already here
            pending.append((key, source, pool.submit(write, key, source.read(name))))
            written += 1
            settle(64)
            if progress and done % 1000 == 0:
                progress(f"{kb}: blobs", done, len(wanted))
        settle(0)
    return written


def remove_stale(folder: Path, pattern: str, age_s: float = 3600.0) -> None:
    """Remove what killed restores left in ``folder`` (``pattern``, untouched for ``age_s``)."""
    for path in folder.glob(pattern):
        try:
            if time.time() - path.stat().st_mtime > age_s:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def _suffix(key: str) -> str:
    return "." + key.rsplit(".", 1)[1] if "." in key.split("/", 1)[1] else ""


def _write_new_blob(staging: Path, key: str, data: bytes) -> bool:
    """``data`` as ``staging/key`` (a new file); False when its bytes do not match the key."""
    if blob_key(data, _suffix(key)) != key:
        return False
    path = staging / key
    path.parent.mkdir(exist_ok=True)
    with open(path, "xb") as out:
        out.write(data)
    return True


def _restore_local_blobs(readers: list[ArchiveReader], kb: str, blobs: LocalBlobStore, wanted: set[str],
                         progress: Progress | None) -> int:
    """``restore_blobs`` into local files: one file creation a blob, as ``tar -x`` does.

    The blobs the store lacks are written into ``<root>/.restoring-<hex>/`` (never a key's path: a file
    cut short by a kill is never taken for a blob), then moved into place, a whole ``<2 hex>/`` folder
    at once where the store has none yet (a fresh restore), else file by file.
    """
    root = blobs.root
    remove_stale(root, ".restoring-*")
    staging = root / f".restoring-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        written = _write_blobs(readers, kb, wanted, lambda key, data: _write_new_blob(staging, key, data),
                               lambda key: (root / validate_key(key)).is_file(), progress)
        for folder in sorted(staging.iterdir()):
            dest = root / folder.name
            try:
                os.rename(folder, dest)  # the store has no such folder yet (or an empty one)
            except OSError:
                for path in sorted(folder.iterdir()):
                    if not (dest / path.name).exists():
                        os.rename(path, dest / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written


async def restore_kb_blobs(readers: list[ArchiveReader], kb: str, blobs: BlobStore, wanted: set[str],
                           missing: set[str], progress: Progress | None = None) -> None:
    """Every ``wanted`` blob of ``kb`` (but the ``missing`` ones) from the archive or its bases into ``blobs``."""
    for key in sorted(wanted - missing):
        name = f"{member_prefix(kb)}blobs/{key}"
        if not any(name in r.members for r in readers):
            raise bad_archive(readers[0].path, f"lacks blob {key} of KB {kb} and no base archive holds it "
                              "(an incremental backup needs its base beside it)")
    if await asyncio.to_thread(restore_blobs, readers, kb, blobs, wanted, progress):
        # one flush of everything written rather than two fsyncs a blob (the caller may pass a blob store
        # that skips them: 4x faster at 20k blobs); the blobs are durable before any point names them
        await asyncio.to_thread(os.sync)


async def import_collection(
    readers: list[ArchiveReader], kb: str, target: VectorStore, blobs: BlobStore,
    progress: Progress | None = None, on_batch: Callable[[int], None] | None = None,
) -> int:
    """Blobs, then points, of archived ``kb`` into ``target`` (empty, ensured); returns the points written.

    ``readers``: the archive first, then its bases (an incremental archive's blobs live there).
    """
    reader = readers[0]
    entry = reader.manifest["kbs"][kb]
    wanted: set[str] = await asyncio.to_thread(lambda: {key for refs in _refs(reader, kb) for key in refs})
    await restore_kb_blobs(readers, kb, blobs, wanted, set(entry.get("missing_blobs") or []), progress)
    total, written = int(entry.get("points", 0)), 0
    points = read_points(reader, kb)
    while True:
        batch = await asyncio.to_thread(next, points, None)
        if batch is None:
            break
        written += await target.import_points(batch)
        if progress:
            progress(f"{kb}: points", written, total)
        if on_batch:
            on_batch(written)
    return written


def _refs(reader: ArchiveReader, kb: str) -> Iterator[list[str]]:
    with reader.open(member_prefix(kb) + "points.jsonl") as lines:
        for raw in lines:
            if raw.strip():
                try:
                    yield point_blobs(json.loads(raw).get("payload") or {})
                except (ValueError, AttributeError) as exc:
                    raise bad_archive(reader.path, f"has an unreadable point of KB {kb} ({exc})") from exc
