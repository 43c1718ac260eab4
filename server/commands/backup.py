"""``vlmrag backup OUT [--kb K] [--incremental BASE] [--format auto|logical] [--json]``: one archive of every KB.

Points with their payloads and every vector, their blobs, the KB catalog and the answer/feedback log,
and a manifest with the sha256 of every member (format: retriever/backup/archive.py), written under a
temporary name and renamed when complete. The embedded store's KBs are archived as their Edge shard's
files (``"method": "edge-shard"``: about ``tar`` of the data dir), a Qdrant server's as their points
(``"logical"``, also what ``--format logical`` gives every KB: portable, ~15x slower). ``--incremental
BASE`` leaves out the blobs the archive BASE holds (keep BASE beside it: a restore reads them there).
The embedded store belongs to one process: while ``vlmrag serve`` holds it (found from
``DATA_DIR/server.json``), the backup goes through that server (``POST /v1/admin/backup``, with the
admin key in ``VLMRAG_API_KEY``): it writes the archive into its ``VLMRAG_BACKUP_DIR`` and the CLI moves
it to OUT (``--incremental BASE`` then names an archive of that folder).

``--json`` prints the archive's summary: ``{"name", "path", "bytes", "created_at", "kind", "base",
"vlmrag_version", "format_version", "embedders", "database", "kbs": {name: {"points", "blobs",
"blobs_in_base", "embedder_id", "method"}}, "via"}`` (``via``: "local" or the server's URL).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import httpx

from retriever.errors import InvalidInput, StoreUnavailable
from server.knowledge_bases import KBCatalog, KnowledgeBases, database_url
from server.services.backups import FORMATS, BackupService
from server.settings import Settings


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("backup", help="Write a consistent archive of the knowledge bases.",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, metavar="OUT", help="The archive to write (e.g. kb.vlmrag.tar).")
    # its own dest: the global --kb scopes the settings to one collection; a backup names KBs itself
    parser.add_argument("--kb", dest="backup_kb", metavar="KB", help="Only this knowledge base.")
    parser.add_argument("--incremental", type=Path, metavar="BASE",
                        help="Leave out the blobs the archive BASE already holds.")
    parser.add_argument("--format", dest="backup_format", choices=FORMATS, default="auto",
                        help="auto (default): an embedded store as its shard's files (fast), a Qdrant server's "
                             "collections as their points; logical: every KB as its points (slower, ~15x).")
    parser.add_argument("--json", action="store_true", help="Machine-readable summary (keys above).")
    parser.set_defaults(func=run)


def unscoped(settings: Settings, args: argparse.Namespace) -> tuple[Settings, str | None]:
    """The service-wide settings and the KB named by the global ``--kb`` (which scoped them to its collection)."""
    from server.knowledge_bases import kb_of

    if not settings.blob_namespace:
        return settings, getattr(args, "kb", None)
    name = kb_of(settings)
    return settings.model_copy(update={"collection": settings.collection.removesuffix(f"__kb_{name}"),
                                       "blob_namespace": ""}), name


def progress_printer(quiet: bool):  # type: ignore[no-untyped-def]
    last: dict[str, int] = {}

    def report(phase: str, done: int, total: int) -> None:
        if not quiet and (done - last.get(phase, -10_000) >= 10_000 or done == total):
            last[phase] = done
            print(f"{phase}: {done}/{total}", file=sys.stderr, flush=True)

    return report


def run(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_run(args, settings))


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    from server.commands.kb import _opener

    settings, scoped = unscoped(settings, args)
    kbs = KnowledgeBases(settings, KBCatalog(database_url(settings)), _opener(settings, False))
    try:
        service = BackupService(settings, kbs, nice=0)  # no server in this process: nothing to yield to
        result = await service.backup(args.out, kb=args.backup_kb or scoped, incremental=args.incremental,
                                      progress=progress_printer(args.json), fmt=args.backup_format)
        result["via"] = "local"
    except StoreUnavailable as exc:
        if "locked" not in exc.message:
            raise
        from server.commands.ingest import find_running_server

        url = find_running_server(settings.data_dir)
        if url is None:
            raise StoreUnavailable(f"{exc.message}. While `vlmrag serve` runs, back up through it: "
                                   "POST /v1/admin/backup (writes into VLMRAG_BACKUP_DIR)") from exc
        result = await _through_server(url, args, args.backup_kb or scoped)
    finally:
        await kbs.close()
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    kbs_line = ", ".join(f"{n} ({k['points']} points, {k['blobs']} blobs)" for n, k in result["kbs"].items())
    via = "" if result["via"] == "local" else f" via {result['via']}"
    print(f"backup {result['path']}: {result['bytes']} bytes, {result['kind']}; {kbs_line}; "
          f"rows {result['database']}{via}")
    return 0


async def _through_server(url: str, args: argparse.Namespace, kb: str | None) -> dict[str, Any]:
    """The backup by the server that holds the store, moved from its backup folder to OUT."""
    from server.commands.ingest import API_KEY_ENV

    headers = {"Authorization": f"Bearer {key}"} if (key := os.environ.get(API_KEY_ENV)) else {}
    body = {"kb": kb, "format": args.backup_format,
            "incremental": args.incremental.name if args.incremental else None}
    try:
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=httpx.Timeout(None, connect=5.0)) as http:
            response = await http.post("/v1/admin/backup", json=body)
    except httpx.HTTPError as exc:
        raise StoreUnavailable(f"vlmrag server at {url} did not answer: {exc}") from exc
    if response.status_code in (401, 403):
        raise InvalidInput(f"the server at {url} refused the backup ({response.status_code}): set "
                           f"{API_KEY_ENV} to an admin key bound to every knowledge base")
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        raise StoreUnavailable(f"the server at {url} answered {response.status_code}: {message}")
    result: dict[str, Any] = response.json()
    written, out = Path(result["path"]), args.out.resolve()
    if written.resolve() != out:  # the server's folder, on this machine (it holds the same data dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(written, out)
        result.update(name=out.name, path=str(out))
    result["via"] = url
    return result
