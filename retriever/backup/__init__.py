"""Backup archives (``vlmrag backup`` / ``vlmrag restore``): the format, collections and their blobs.

``archive.py`` is the tar with its manifest and checksums, ``collection.py`` one collection's points
and blobs in it, ``restore.py`` the restore into a new version with an atomic switch. The SQL tables
(catalog, answer log) and the orchestration over knowledge bases are the server's
(server/backup_tables.py, server/services/backups.py).
"""

from __future__ import annotations

from retriever.backup.archive import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    ArchiveReader,
    ArchiveWriter,
    read_manifest,
    stale_partials,
    vlmrag_version,
)
from retriever.backup.collection import StagedCollection, archived_blobs, stage_collection, write_collection
from retriever.backup.restore import RestoredCollection, restore_collection

__all__ = [
    "FORMAT", "FORMAT_VERSION", "MANIFEST", "ArchiveReader", "ArchiveWriter", "RestoredCollection",
    "StagedCollection", "archived_blobs", "read_manifest", "restore_collection", "stage_collection",
    "stale_partials", "vlmrag_version", "write_collection",
]
