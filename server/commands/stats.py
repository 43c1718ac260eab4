"""``vlmrag stats [--json]``: snippet count, counts by kind and by source, embedder, store.

``--json`` prints ``{"count": int, "by_kind": {kind: int}, "by_source": {source: int},
"embedder": str | null, "store": str, "collection": str, "blobs": str, "lexical": bool,
"passage": {"embedder": str, "dim": int} | null, "text_embedder": str | null}``; ``embedder`` is the
identity stored with the collection (null before anything was ingested); ``passage`` the text
embedder of its ``passage`` vector (null: made without one, `vlmrag backfill-passage` adds it).
No model is loaded (``text_embedder``, the configured one, is then null).
"""

from __future__ import annotations

import argparse
import asyncio
import json

from server.settings import Settings
from server.wiring import build_knowledge_base

TOP_SOURCES = 20


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("stats", help="Knowledge-base statistics.", description=__doc__)
    parser.add_argument("--json", action="store_true", help="Machine-readable output (keys above).")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_run(args, settings))


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    kb = await build_knowledge_base(settings, load_model=False)
    try:
        stats = await kb.stats()
    finally:
        await kb.close()
    if args.json:
        print(json.dumps(stats, indent=2, ensure_ascii=False))
        return 0
    print(f"snippets:   {stats['count']}")
    print(f"by kind:    {', '.join(f'{k} {v}' for k, v in stats['by_kind'].items()) or '-'}")
    print(f"embedder:   {stats['embedder'] or '- (empty collection)'}")
    print(f"store:      {stats['store']} (collection {stats['collection']})")
    print(f"blobs:      {stats['blobs']}")
    sources = list(stats["by_source"].items())
    print(f"sources:    {len(sources)}")
    for source, count in sources[:TOP_SOURCES]:
        print(f"  {count:>7}  {source}")
    if len(sources) > TOP_SOURCES:
        print(f"  … and {len(sources) - TOP_SOURCES} more (use --json)")
    return 0
