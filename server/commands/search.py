"""``vlmrag search [TEXT] [--image FILE]... [--limit N] [--mode M] [--exact] [--source S] [--tag T]... [--json]``.

Retrieval only (no re-ranking, no answer): text, image(s), or both, searched and fused exactly as the
API's ``/v1/search`` does before re-ranking — the plan is resolved the same way (options over the
KB's defaults over ``VLMRAG_RETRIEVAL_*``), so ``VLMRAG_RETRIEVAL_MODE=lexical`` searches BM25 only,
and query images are read by OCR when the mode uses BM25. ``--json`` prints one object with stable keys::

    {"query": {"text": str | null, "images": [path], "limit": int,
               "filters": {"source": str | null, "tags": [str] | null, "kind": [str] | null}},
     "results": [{"rank": int, "id": str, "score": float, "kind": str, "source": str, "text": str,
                  "tags": [str], "image_ref": str | null, "thumb_ref": str | null, "page": int | null,
                  "vector_scores": {"text->image": float, ...}}],
     "timings_ms": {"embed": float, "search": float, "total": float}}

``score`` is the fused score in (0, 1]; ``vector_scores`` holds the cosine (BM25 score for
``…->lexical``) of each ranked list the snippet appeared in (``<query part>-><vector name>``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any, get_args

from retriever.errors import InvalidInput
from retriever.images import decode_image
from retriever.plan import RetrievalMode
from server.api_models import RetrievalFilters, RetrievalOptions
from server.knowledge_bases.catalog import kb_defaults
from server.services.planning import resolve_plan
from server.settings import Settings
from server.wiring import build_knowledge_base, build_ocr_engine, build_query_ocr

KINDS = ("image", "text", "image_text", "page")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("search", help="CLIP search of the knowledge base (text and/or image).",
                                   description=__doc__.split("\n\n")[1])
    parser.add_argument("text", nargs="?", default=None, metavar="TEXT")
    parser.add_argument("--image", action="append", default=[], type=Path, metavar="FILE",
                        help="Query image (repeatable: several are averaged).")
    parser.add_argument("--limit", type=int, default=10, help="Number of results (default 10).")
    parser.add_argument("--source", default=None, help="Only snippets with this exact source.")
    parser.add_argument("--tag", action="append", default=None, help="Only snippets with any of these tags.")
    parser.add_argument("--kind", action="append", default=None, choices=KINDS, help="Only these kinds.")
    parser.add_argument("--mode", default=None, choices=get_args(RetrievalMode),
                        help="hybrid | dense | lexical (default: the KB's, else VLMRAG_RETRIEVAL_MODE).")
    parser.add_argument("--exact", action="store_true", default=None, help="Exact vector search (no HNSW).")
    parser.add_argument("--json", action="store_true", help="Machine-readable output (keys above).")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_run(args, settings))


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    if not (args.text or "").strip() and not args.image:
        raise InvalidInput("give a TEXT query, --image FILE, or both")
    if args.limit < 1:
        raise InvalidInput("--limit must be at least 1")
    images = []
    for path in args.image:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InvalidInput(f"cannot read {path}: {exc.strerror or exc}") from exc
        images.append(decode_image(data, max_bytes=settings.limit_image_bytes,
                                   max_pixels=settings.limit_image_pixels, filename=str(path)).image)
    filters = RetrievalFilters(source=args.source, tags=args.tag, kind=args.kind)
    options = RetrievalOptions(pool=args.limit, mode=args.mode, exact=args.exact, filters=filters)
    plan = resolve_plan(settings, options, param_prefix="--", defaults=await kb_defaults(settings))
    plan.pool = args.limit  # the CLI's --limit is the number of results, even below the default k
    engine = build_ocr_engine(settings) if settings.ocr_enabled and images and plan.mode != "dense" else None
    kb = await build_knowledge_base(settings, ocr=engine)
    try:
        result = await kb.search(args.text, images, plan, ocr=build_query_ocr(settings, engine))
    finally:
        await kb.close()
    output: dict[str, Any] = {
        "query": {"text": args.text, "images": [str(p) for p in args.image], "limit": args.limit, "mode": plan.mode,
                  "filters": {"source": args.source, "tags": args.tag, "kind": args.kind}},
        "results": [
            {"rank": c.rank, "id": c.id, "score": round(c.clip_score, 6), "kind": c.payload.kind,
             "source": c.payload.source, "text": c.payload.text, "tags": c.payload.tags,
             "image_ref": c.payload.image_ref, "thumb_ref": c.payload.thumb_ref, "page": c.payload.page,
             "vector_scores": {k: round(v, 6) for k, v in c.vector_scores.items()}}
            for c in result.candidates
        ],
        "timings_ms": {k: round(v, 3) for k, v in result.timings.items()},
    }
    if args.json:
        print(json.dumps(output, indent=2, ensure_ascii=False))
        return 0
    if not output["results"]:
        print("no results")
    for hit in output["results"]:
        where = hit["source"] + (f" p.{hit['page']}" if hit["page"] else "")
        text = " ".join(hit["text"].split())
        print(f"{hit['rank']:>3}. {hit['score']:.3f}  [{hit['kind']}] {where}  {hit['id']}")
        if text:
            print(f"     {text[:160]}{'…' if len(text) > 160 else ''}")
    return 0
