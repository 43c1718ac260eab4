"""``vlmrag restore IN [--kb K] [--as NEW] [--replace] [--base BASE] [--json]``: restore a backup archive.

Every checksum is verified before anything is touched. An archive whose embedder is not the
configured one (``VLMRAG_CLIP_MODEL``, ``VLMRAG_TEXT_EMBEDDER``) is refused unless ``--reembed``: then
its points get vectors of the configured models from their stored text and blobs (as ``vlmrag
reindex`` does; a point with neither is left out and counted as ``skipped``). Each KB is
restored into a new version of its collection and switched to atomically (the ``__current`` symlink
of the embedded store, an alias on a Qdrant server), so a failed or killed restore leaves the served
KB as it was. A KB that holds snippets is replaced only with ``--replace``; ``--as NEW`` restores
archived KB ``--kb K`` as the new KB NEW. With ``VLMRAG_QDRANT_URL`` set the archive goes into that
Qdrant server: the migration path from the embedded store (an archive of the embedded store holds its
shard's files, "method": "edge-shard": restored into the embedded store they are put in place as they
are, into a Qdrant server their points are streamed out of them, the slower way). The embedded store
belongs to one process: stop ``vlmrag serve`` first.

``--json`` prints ``{"archive", "restored": [{"kb", "from", "version", "previous", "points",
"dropped", "reembedded", "skipped"}], "rows": {table: rows written}}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from retriever.errors import StoreUnavailable
from server.commands.backup import progress_printer, unscoped
from server.services.backups import restore
from server.settings import Settings


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("restore", help="Restore a backup archive (verified, switched atomically).",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("archive", type=Path, metavar="IN", help="The archive `vlmrag backup` wrote.")
    parser.add_argument("--kb", dest="restore_kb", metavar="KB", help="Only this knowledge base of the archive.")
    parser.add_argument("--as", dest="as_name", metavar="NEW", help="Restore KB --kb as the knowledge base NEW.")
    parser.add_argument("--replace", action="store_true", help="Replace knowledge bases that hold snippets.")
    parser.add_argument("--reembed", action="store_true", help="Re-embed an archive of another model with the configured one.")
    parser.add_argument("--base", type=Path, help="The base of an incremental archive (default: beside it).")
    parser.add_argument("--json", action="store_true", help="Machine-readable summary (keys above).")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_run(args, settings))


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    settings, scoped = unscoped(settings, args)
    try:
        result = await restore(settings, args.archive, kb=args.restore_kb or scoped, as_name=args.as_name,
                               replace=args.replace, reembed=args.reembed, base=args.base,
                               progress=progress_printer(args.json))
    except StoreUnavailable as exc:
        if "locked" in exc.message:
            raise StoreUnavailable(f"{exc.message}. Stop `vlmrag serve` before restoring into the embedded "
                                   "store (nothing was changed)") from exc
        raise
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for item in result["restored"]:
        note = f", re-embedded ({item['skipped']} without text or image left out)" if item["reembedded"] else ""
        print(f"restored {item['kb']}: {item['points']} points{note} into {item['version']} (was "
              f"{item['previous'] or 'empty'}){'; dropped ' + ', '.join(item['dropped']) if item['dropped'] else ''}")
    print(f"rows: {result['rows']}")
    return 0
