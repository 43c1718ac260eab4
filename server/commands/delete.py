"""``vlmrag delete --source S | --id ID [--json]``: remove snippets (and their now unused images).

Deleting a source that has no snippets is not an error (prints 0; idempotent for scripts); an
unknown ``--id`` is (exit 1). ``--json`` prints ``{"deleted": int}``. No model is loaded.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from server.settings import Settings
from server.wiring import build_knowledge_base


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("delete", help="Delete snippets by source or id.", description=__doc__)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--source", help="Delete every snippet with exactly this source.")
    which.add_argument("--id", dest="point_id", help="Delete one snippet by id.")
    parser.add_argument("--json", action="store_true", help='Print {"deleted": N}.')
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_run(args, settings))


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    kb = await build_knowledge_base(settings, load_model=False)
    try:
        if args.point_id:
            await kb.delete(args.point_id)
            deleted = 1
        else:
            deleted = await kb.delete_by_source(args.source)
    finally:
        await kb.close()
    print(json.dumps({"deleted": deleted}) if args.json else f"deleted {deleted} snippet(s)")
    return 0
