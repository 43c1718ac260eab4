"""``vlmrag kb create|list|show|update|delete``: the knowledge bases of this service (see server/knowledge_bases.py).

Other commands work on one KB with the global ``--kb NAME`` (``vlmrag --kb pumps ingest docs/``).
``create`` loads the CLIP model to create the KB's collection; the others do not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from server.knowledge_bases import KBCatalog, KBSpec, KnowledgeBases, collection_for, database_url
from server.settings import Settings


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("kb", help="Create, list, show, update and delete knowledge bases.",
                                   description=__doc__)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="A new knowledge base.")
    create.add_argument("name")
    for p in (create, update := actions.add_parser("update", help="Change a knowledge base.")):
        p.add_argument("--display-name")
        p.add_argument("--description")
        p.add_argument("--system-prompt", help="Added to the system prompt of its answers.")
        p.add_argument("--retrieval", metavar="JSON", help='Retrieval defaults, e.g. \'{"k": 3, "scorer": "clip"}\'.')
    update.add_argument("name")
    actions.add_parser("list", help="Every knowledge base.").add_argument("--json", action="store_true")
    show = actions.add_parser("show", help="One knowledge base, with its snippet count.")
    show.add_argument("name")
    show.add_argument("--json", action="store_true")
    delete = actions.add_parser("delete", help="Delete a knowledge base: its snippets, images and settings.")
    delete.add_argument("name")
    delete.add_argument("--yes", action="store_true", help="Do not ask for confirmation.")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_run(args, settings))


def _changes(args: argparse.Namespace) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    for name in ("display_name", "description", "system_prompt"):
        if getattr(args, name, None) is not None:
            changes[name] = getattr(args, name)
    if getattr(args, "retrieval", None):
        changes["retrieval"] = json.loads(args.retrieval)
    return changes


def _opener(settings: Settings, load_model: bool):  # type: ignore[no-untyped-def]
    embedder = text_embedder = None

    async def open_kb(collection: str, namespace: str):  # type: ignore[no-untyped-def]
        nonlocal embedder, text_embedder
        from server.wiring import build_embedder, build_knowledge_base, build_text_embedder

        if load_model and embedder is None:
            embedder = await asyncio.to_thread(build_embedder, settings)
            text_embedder = await asyncio.to_thread(build_text_embedder, settings, embedder.cache)
        return await build_knowledge_base(settings, embedder=embedder, text_embedder=text_embedder,
                                          collection=collection, blob_namespace=namespace, load_model=load_model)

    return open_kb


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    kbs = KnowledgeBases(settings, KBCatalog(database_url(settings)), _opener(settings, args.action == "create"))
    try:
        if args.action == "create":
            spec = KBSpec(name=args.name, **_changes(args))
            await kbs.create(spec)
            print(f"created knowledge base {spec.name} (collection {collection_for(settings, spec.name)}); "
                  f"chat with model \"{settings.model_alias}/{spec.name}\", bind keys as chat@{spec.name}:…")
        elif args.action == "update":
            spec = await kbs.update(args.name, _changes(args))
            print(json.dumps(spec.public(), indent=2, ensure_ascii=False))
        elif args.action == "list":
            specs = await kbs.specs()
            if args.json:
                print(json.dumps([s.public() for s in specs], indent=2, ensure_ascii=False))
            for s in [] if args.json else specs:
                print(f"{s.name:<24} {s.display_name or '-':<30} {collection_for(settings, s.name)}")
        elif args.action == "show":
            spec = await kbs.spec(args.name)
            info = {**spec.public(), "collection": collection_for(settings, spec.name),
                    "count": await (await kbs.get(args.name)).count()}
            print(json.dumps(info, indent=2, ensure_ascii=False))
        elif args.action == "delete":
            if not args.yes and input(f"delete knowledge base {args.name} and all its snippets? [y/N] ").lower() != "y":
                print("not deleted")
                return 1
            result = await kbs.delete(args.name)
            print(f"deleted knowledge base {args.name}: {result['snippets']} snippets and their images")
    finally:
        await kbs.close()
    return 0
