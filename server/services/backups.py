"""Backups and restores of the knowledge bases (``vlmrag backup`` / ``restore``, ``/v1/admin/backup(s)``).

``BackupService.backup`` writes one archive (retriever/backup/) of every KB or one: for each KB, its
points and blobs at one moment (``stage_collection``: writes wait while it reads, searches go on),
then the catalog and answer log rows (server/backup_tables.py), then the manifest, and renames the
archive into place. ``--incremental BASE`` leaves out the blobs BASE already holds (the manifest
names BASE; a restore finds it beside the archive). ``BackupSchedule`` runs one every
``backup_interval_s`` into ``backup_dir`` and keeps the last ``backup_keep``.

``restore`` verifies every checksum first, refuses an archive whose embedder is not the configured one,
then restores each KB into a new version and switches (retriever/backup/restore.py), and writes the
rows last. It runs beside a stopped server for the embedded store (the store belongs to one process),
or against a Qdrant server at any time (``VLMRAG_QDRANT_URL``: the migration path).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retriever.backup import (
    FORMAT,
    FORMAT_VERSION,
    ArchiveReader,
    ArchiveWriter,
    archived_blobs,
    restore_collection,
    stage_collection,
    stale_partials,
    vlmrag_version,
    write_collection,
)
from retriever.backup.archive import run_niced
from retriever.backup.collection import LOGICAL, Progress
from retriever.backup.restore import archived_passage, served_count
from retriever.backup.shard import stage_edge_collection
from retriever.blobs import BlobStore, LocalBlobStore
from retriever.embedder import ClipEmbedder
from retriever.errors import Conflict, InvalidInput, NotFound, StoreUnavailable
from retriever.ingest.rules import IngestRules
from retriever.reindex import EdgeVersions, Versions, _PointRebuilder
from retriever.store import VectorStore
from retriever.store.edge import EdgeStore
from retriever.text_embedder import configured_passage_spec
from server.backup_tables import dump_tables, load_tables
from server.knowledge_bases import DEFAULT_KB, KnowledgeBases, blob_namespace, check_name, collection_for
from server.settings import Settings
from server.wiring import build_blob_store, open_configured_store

log = logging.getLogger(__name__)
ARCHIVE_SUFFIX = ".vlmrag.tar"
#: ``vlmrag backup --format``: "auto" (an embedded store as its shard, a Qdrant server logically), "logical"
FORMATS = ("auto", LOGICAL)


def archive_name(at: float | None = None, kb: str | None = None) -> str:
    at = at or time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(at)) + f".{int(at * 1000) % 1000:03d}Z"
    return f"vlmrag-{stamp}{'-' + kb if kb else ''}{ARCHIVE_SUFFIX}"


def summary(path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """What listing and the API say of an archive."""
    return {
        "name": path.name, "path": str(path), "bytes": path.stat().st_size if path.exists() else None,
        "created_at": manifest.get("created_at"), "kind": manifest.get("kind"),
        "base": (manifest.get("base") or {}).get("file"), "vlmrag_version": manifest.get("vlmrag_version"),
        "format_version": manifest.get("format_version"), "embedders": manifest.get("embedders", []),
        "database": manifest.get("database", {}),
        "kbs": {name: {"points": e.get("points"), "blobs": e.get("blobs"), "blobs_in_base": e.get("blobs_in_base"),
                       "embedder_id": e.get("embedder_id"), "method": e.get("method", LOGICAL)}
                for name, e in manifest.get("kbs", {}).items()},
    }


def base_chain(reader: ArchiveReader, explicit: Path | None = None) -> list[ArchiveReader]:
    """The archives an incremental one leaves blobs in, nearest first (found beside it, by name)."""
    chain: list[ArchiveReader] = []
    current = reader
    while current.manifest.get("base"):
        base = current.manifest["base"]
        path = explicit if explicit is not None and not chain else current.path.parent / str(base.get("file"))
        if not path.is_file():
            raise InvalidInput(f"backup archive {current.path} is incremental: its base {base.get('file')} is not "
                               f"beside it (give --base PATH); nothing was changed", param="archive")
        found = ArchiveReader(path)
        if found.manifest_sha256 != base.get("manifest_sha256"):
            raise InvalidInput(f"{path} is not the base {current.path} was made from (its manifest differs); "
                               "nothing was changed", param="archive")
        chain.append(found)
        current = found
        if len(chain) > 100:
            raise InvalidInput(f"backup archive {reader.path}: its chain of bases is too long", param="archive")
    return chain


class BackupService:
    """Archives of the KBs this service holds."""

    def __init__(self, settings: Settings, knowledge_bases: KnowledgeBases, *, nice: int = 10) -> None:
        self.settings = settings
        self.kbs = knowledge_bases
        #: the archive-writing thread's nice increment: 10 in the server (searches first), 0 for the CLI
        self.nice = nice
        self._lock = asyncio.Lock()  # one backup at a time: each holds every KB's writes for a while

    @property
    def directory(self) -> Path | None:
        return Path(self.settings.backup_dir) if self.settings.backup_dir else None

    async def backup(
        self, out: Path, *, kb: str | None = None, incremental: Path | None = None, progress: Progress | None = None,
        fmt: str = "auto",
    ) -> dict[str, Any]:
        """Write the archive ``out`` (see the module doc); returns its ``summary``.

        ``fmt``: "auto" archives an embedded (Edge) store as its shard's files and a Qdrant server's
        collection as its points; "logical" archives every KB as its points (portable, ~15x slower).
        """
        if fmt not in FORMATS:
            raise InvalidInput(f"backup format must be one of {', '.join(FORMATS)}, not {fmt!r}", param="format")
        names = [kb] if kb else await self.kbs.names()
        for name in names:
            await self.kbs.spec(name)  # NotFound for an unknown KB, before anything is written
        base_blobs: dict[str, set[str]] = {}
        base: dict[str, Any] | None = None
        if incremental is not None:
            with ArchiveReader(incremental) as reader:
                base = {"file": reader.path.name, "manifest_sha256": reader.manifest_sha256}
                known = [reader, *base_chain(reader)]
                base_blobs = {n: set().union(*(archived_blobs(r, n) for r in known)) for n in names}
                for r in known[1:]:
                    r.close()
        async with self._lock:
            started = time.time()
            staging_root = Path(self.settings.data_dir) / "backup-staging"
            staging_root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=staging_root))  # beside the blobs: staged by hard link
            writer = await asyncio.to_thread(ArchiveWriter, Path(out))
            holds = ExitStack()  # blob stores' deletes held until their blobs are in the archive
            try:
                staged = []
                for name in names:
                    opened = await self.kbs.get(name)
                    store, folder = opened.store, staging / name
                    options: dict[str, Any] = {"collection": opened.collection, "base_blobs": base_blobs.get(name),
                                               "progress": progress}
                    if fmt != LOGICAL and isinstance(store, EdgeStore) and await store.count():  # its shard's files
                        staged.append(await stage_edge_collection(name, store, opened.blobs, folder, writer=writer,
                                                                  holds=holds, nice=self.nice, **options))
                    else:
                        staged.append(await stage_collection(name, store, opened.blobs, folder, **options))
                database = await asyncio.to_thread(dump_tables, self.settings, writer, [kb] if kb else None)
                for item in staged:  # tar and sha256 on a low-priority thread: searches keep their core
                    await run_niced(write_collection, writer, item, nice=self.nice)
                embedders = {(s.embedder_id, s.dim) for s in staged if s.embedder_id}
                manifest = {
                    "format": FORMAT, "format_version": FORMAT_VERSION, "vlmrag_version": vlmrag_version(),
                    "created_at": started, "kind": "incremental" if base else "full", "base": base,
                    "kbs": {s.kb: s.entry() for s in staged},
                    "embedders": [{"id": i, "dim": d} for i, d in sorted(embedders, key=str)],
                    "database": database,
                }
                manifest = await asyncio.to_thread(writer.finish, manifest)
            except OSError as exc:  # disk full, folder gone: ours, not the caller's
                await asyncio.to_thread(writer.abort)
                raise StoreUnavailable(f"writing the backup {out} failed: {exc}") from exc
            except BaseException:
                await asyncio.to_thread(writer.abort)
                raise
            finally:
                await asyncio.to_thread(holds.close)
                await asyncio.to_thread(shutil.rmtree, staging, True)
        log.info("backup %s written in %.1f s: %s", out, time.time() - started,
                 ", ".join(f"{s.kb} {s.points} points" for s in staged))
        return summary(Path(out), manifest)

    async def backup_into_dir(self, *, kb: str | None = None, incremental: str | None = None,
                              fmt: str = "auto") -> dict[str, Any]:
        """A backup named by its time in ``backup_dir`` (the API and the schedule)."""
        directory = self._require_dir()
        base = None
        if incremental:
            base = directory / Path(incremental).name
            if not base.is_file():
                raise NotFound(f"no backup {incremental!r} in the backup folder", param="incremental")
        return await self.backup(directory / archive_name(kb=kb), kb=kb, incremental=base, fmt=fmt)

    def _require_dir(self) -> Path:
        if self.directory is None:
            raise InvalidInput("backups through the API go to VLMRAG_BACKUP_DIR, which is not set",
                               param="backup_dir", code="backup_dir_unset")
        self.directory.mkdir(parents=True, exist_ok=True)
        return self.directory

    def archives(self) -> list[dict[str, Any]]:
        """The archives in ``backup_dir``, newest first (unreadable ones with their error)."""
        directory = self._require_dir()
        found = []
        for path in sorted(directory.glob(f"*{ARCHIVE_SUFFIX}"), reverse=True):
            try:
                with ArchiveReader(path) as reader:
                    found.append(summary(path, reader.manifest))
            except InvalidInput as exc:
                found.append({"name": path.name, "path": str(path), "error": exc.message})
        return found

    def prune(self, keep: int) -> list[str]:
        """Remove all but the newest ``keep`` full archives (and incremental ones on removed bases)."""
        directory = self._require_dir()
        for partial in stale_partials(directory):
            if time.time() - partial.stat().st_mtime > 3600:  # a killed backup's leftover
                partial.unlink(missing_ok=True)
        archives = sorted(directory.glob(f"*{ARCHIVE_SUFFIX}"))
        fulls = [p for p in archives if _kind(p) == "full"]
        doomed = set(fulls[:-keep] if keep > 0 else [])
        kept_fulls = {p.name for p in fulls} - {p.name for p in doomed}
        for path in archives:
            if path not in doomed and _kind(path) == "incremental" and _base_of(path) not in kept_fulls \
                    and _base_of(path) not in {p.name for p in archives if p not in doomed}:
                doomed.add(path)
        for path in doomed:
            path.unlink(missing_ok=True)
        return sorted(p.name for p in doomed)


def _kind(path: Path) -> str | None:
    try:
        with ArchiveReader(path) as reader:
            return str(reader.manifest.get("kind"))
    except InvalidInput:
        return None


def _base_of(path: Path) -> str | None:
    try:
        with ArchiveReader(path) as reader:
            return (reader.manifest.get("base") or {}).get("file")
    except InvalidInput:
        return None


class BackupSchedule:
    """Inside the server: a backup every ``backup_interval_s`` into ``backup_dir``, the last ``backup_keep`` kept."""

    def __init__(self, service: BackupService, interval_s: float, keep: int) -> None:
        self.service, self.interval_s, self.keep = service, interval_s, keep
        self._task: asyncio.Task[None] | None = None
        self.last: dict[str, Any] | None = None
        self.last_error: str | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="vlmrag-backup-schedule")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self.last = await self.service.backup_into_dir()
                self.last_error = None
                removed = await asyncio.to_thread(self.service.prune, self.keep)
                if removed:
                    log.info("scheduled backup: removed %s (keeping %d)", ", ".join(removed), self.keep)
            except Exception as exc:  # the next one may work (disk full now, space later)
                self.last_error = str(exc)
                log.exception("scheduled backup failed")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


# --- restore -----------------------------------------------------------------------------------------
@dataclass(slots=True)
class RestorePlan:
    """What a restore will write: archived KB -> target KB."""

    renames: dict[str, str] = field(default_factory=dict)


async def open_versions(settings: Settings, collection: str) -> tuple[Versions, VectorStore | None]:
    """The versions of ``collection`` in the configured store (and the store owning its client, to close)."""
    if not settings.qdrant_url.strip():
        return EdgeVersions(Path(settings.embedded_store_path), collection), None
    store = await open_configured_store(settings, collection)
    return store.versions(), store


def load_configured_embedder(settings: Settings) -> ClipEmbedder:
    """The configured CLIP model (loaded with torch: no ONNX export for a restore)."""
    from server.wiring import build_embedder

    return build_embedder(settings.model_copy(update={"clip_backend": "torch"}))


def configured_embedder(settings: Settings) -> tuple[str, int]:
    """Identity and dimension of the configured CLIP model (from its config: the weights are not loaded)."""
    from retriever.embedder import embedder_identity

    try:
        return embedder_identity(settings.clip_model, settings.clip_pretrained)
    except Exception:  # noqa: BLE001 - what the loader says about odd settings is the clearer error
        embedder = load_configured_embedder(settings)
        return embedder.identity, embedder.dim


def rebuilder_for(settings: Settings, embedder: ClipEmbedder, blobs: BlobStore) -> _PointRebuilder:
    """What ``--reembed`` embeds the restored points with: the configured CLIP (and text) model, as reindex does."""
    from server.wiring import build_text_embedder

    rules = IngestRules(max_image_bytes=max(settings.limit_image_bytes, 50 << 20),
                        max_image_pixels=settings.limit_image_pixels)
    return _PointRebuilder(embedder, blobs, rules, build_text_embedder(settings, None), settings.text_embedder_ocr)


async def restore(
    settings: Settings, archive: Path, *, kb: str | None = None, as_name: str | None = None, replace: bool = False,
    reembed: bool = False, base: Path | None = None, progress: Progress | None = None,
) -> dict[str, Any]:
    """Restore ``archive`` (see the module doc); returns what was restored."""
    with ArchiveReader(archive) as reader:
        chain = base_chain(reader, base)
        try:
            for r in [reader, *chain]:
                await asyncio.to_thread(r.verify)
            return await _restore(settings, [reader, *chain], kb=kb, as_name=as_name, replace=replace,
                                  reembed=reembed, progress=progress)
        finally:
            for r in chain:
                r.close()


async def _restore(
    settings: Settings, readers: list[ArchiveReader], *, kb: str | None, as_name: str | None, replace: bool,
    reembed: bool, progress: Progress | None,
) -> dict[str, Any]:
    reader = readers[0]
    archived: dict[str, Any] = reader.manifest["kbs"]
    if kb is not None and kb not in archived:
        raise NotFound(f"backup archive {reader.path} holds no knowledge base {kb!r} (it holds "
                       f"{', '.join(sorted(archived)) or 'none'}); nothing was changed", param="kb")
    names = [kb] if kb else sorted(n for n, e in archived.items() if e.get("embedder_id"))
    if as_name is not None:
        if len(names) != 1:
            raise InvalidInput("--as NEW restores one knowledge base: name it with --kb", param="as")
        check_name(as_name)
    plan = RestorePlan({n: as_name or n for n in names})
    identity, dim = await asyncio.to_thread(configured_embedder, settings)
    passage = await asyncio.to_thread(configured_passage_spec, settings.text_embedder)
    reembedded: set[str] = set()  # --reembed: KBs of another model, re-embedded from their text and blobs
    for name in names:
        entry = archived[name]
        stored = archived_passage(entry)
        other_clip = entry.get("embedder_id") != identity or int(entry.get("dim") or 0) != dim
        other_text = stored is not None and passage is not None and not stored.same_embedder(passage)
        if (other_clip or other_text) and reembed:
            reembedded.add(name)
        elif other_clip:
            raise Conflict(f"backup archive {reader.path}: knowledge base {name!r} was embedded with "
                           f"{entry.get('embedder_id')}, this service uses {identity} (VLMRAG_CLIP_MODEL); "
                           "restore with the same model, or --reembed; nothing was changed")
        elif other_text and stored is not None and passage is not None:
            raise Conflict(f"backup archive {reader.path}: knowledge base {name!r} has passage vectors of text "
                           f"embedder {stored.embedder_id}, this service uses {passage.embedder_id} "
                           "(VLMRAG_TEXT_EMBEDDER); restore with the same model, or --reembed; nothing was changed")
    embedder = await asyncio.to_thread(load_configured_embedder, settings) if reembedded else None
    if embedder is not None and (embedder.identity, embedder.dim) != (identity, dim):
        raise Conflict(f"the configured CLIP model loads as {embedder.identity}, not {identity}; nothing was changed")
    for target in plan.renames.values():  # every target checked before any is touched
        versions, owner = await open_versions(settings, collection_for(settings, target))
        try:
            _, count = await served_count(versions)
        finally:
            if owner is not None:
                await owner.close()
        if count and not replace:
            raise Conflict(f"knowledge base {target!r} holds {count} snippets; restore with --replace to replace "
                           "it, or --as NEW into a new knowledge base; nothing was changed")
    restored = []
    for source, target in plan.renames.items():
        versions, owner = await open_versions(settings, collection_for(settings, target))
        try:
            blobs = build_blob_store(settings, blob_namespace(target))
            if isinstance(blobs, LocalBlobStore):  # no fsync per blob: import_collection syncs once after them
                blobs = LocalBlobStore(blobs.root, fsync=False)
            rebuilder = await asyncio.to_thread(rebuilder_for, settings, embedder, blobs) \
                if source in reembedded and embedder is not None else None
            result = await restore_collection(readers, source, versions, blobs, replace=replace, progress=progress,
                                              scratch=Path(settings.data_dir) / "backup-staging", rebuilder=rebuilder)
        finally:
            if owner is not None:
                await owner.close()
        restored.append({"kb": target, "from": source, "version": result.version, "previous": result.previous,
                         "points": result.points, "dropped": result.dropped, "reembedded": source in reembedded,
                         "skipped": result.skipped})
    rows = await asyncio.to_thread(load_tables, settings, reader, plan.renames, replace=replace)
    await _ensure_catalog_rows(settings, [t for t in plan.renames.values() if t != DEFAULT_KB])
    return {"archive": str(reader.path), "restored": restored, "rows": rows}


async def _ensure_catalog_rows(settings: Settings, names: list[str]) -> None:
    """A restored KB the archive had no catalog row for gets one, so the service sees it."""
    from server.knowledge_bases import KBCatalog, KBSpec, database_url

    catalog = KBCatalog(database_url(settings))
    try:
        for name in names:
            if await catalog.get(name) is None:
                await catalog.insert(KBSpec(name, created_at=time.time()))
    finally:
        catalog.close()
