"""``vlmrag reindex --to MODEL [--pretrained TAG] [--no-switch] [--drop-old]``: move to a new CLIP model.

Builds ``<collection>__vN`` with the new model from the stored snippets (text from payloads, images
from the blob store) while the old version keeps serving, then switches atomically: a Qdrant alias
on a server, the ``<collection>__current`` symlink on the embedded store. The old version stays
until ``--drop-old`` (alone: drop every version but the served one). An interrupted run resumes.
Afterwards start the service with the new ``VLMRAG_CLIP_MODEL`` / ``VLMRAG_CLIP_PRETRAINED``.

``--json`` prints ``{"old", "new", "embedder", "copied", "resumed", "caught_up", "removed",
"text_only": [str], "skipped": [str], "switched", "dropped": [str], "seconds"}`` (drop-only:
``{"dropped": [str]}``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from retriever.errors import InvalidInput, StoreUnavailable
from retriever.reindex import (
    EdgeVersions,
    ProgressFn,
    Versions,
    drop_old_versions,
    reindex,
)
from retriever.store import VectorStore, open_store
from server.settings import Settings
from server.wiring import build_blob_store


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "reindex", help="Re-embed the knowledge base with a new CLIP model, switching with no downtime.",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--to", metavar="MODEL", help="New open_clip model name or model-config JSON path.")
    parser.add_argument("--pretrained", metavar="TAG",
                        help="Its weights: tag, local file, local-dir:PATH or none (default: VLMRAG_CLIP_PRETRAINED).")
    parser.add_argument("--no-switch", action="store_true",
                        help="Build (or resume) the new version but keep serving the old one.")
    parser.add_argument("--drop-old", action="store_true", help="Delete every version but the served one.")
    parser.add_argument("--batch-size", type=int, default=0, help="Snippets per batch (default VLMRAG_CLIP_BATCH_SIZE).")
    parser.add_argument("--json", action="store_true", help="Machine-readable summary (keys above).")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    if not args.to and not args.drop_old:
        raise InvalidInput("nothing to do: give --to MODEL (re-index) and/or --drop-old (clean up)")
    if args.no_switch and args.drop_old and args.to:
        raise InvalidInput("--drop-old with --no-switch would drop nothing new; run --drop-old after switching")
    return asyncio.run(_run(args, settings))


async def _open_versions(settings: Settings) -> tuple[Versions, VectorStore | None]:
    """The version manager for the configured store (and the opened store owning its client).

    The embedded store is not opened here: its versions are opened one by one (one process per shard).
    """
    if not settings.qdrant_url.strip():
        return EdgeVersions(Path(settings.embedded_store_path), settings.collection), None
    opened = await open_store(
        qdrant_url=settings.qdrant_url, api_key=settings.qdrant_api_key, path=settings.embedded_store_path,
        collection=settings.collection, shard_number=settings.qdrant_shard_number,
        replication_factor=settings.qdrant_replication_factor,
        write_consistency_factor=settings.qdrant_write_consistency_factor,
        read_consistency=settings.qdrant_read_consistency, timeout_s=settings.qdrant_timeout_s,
    )
    return opened.versions(), opened


def _progress_printer() -> ProgressFn:
    """Progress lines on stderr: at each phase change, every 1000 snippets and at the end."""
    last: dict[str, object] = {"phase": "", "done": -1000}

    def report(phase: str, done: int, total: int | None) -> None:
        if phase != last["phase"] or done == total or done - int(str(last["done"])) >= 1000:
            print(f"{phase}: {done}/{total if total is not None else '?'}", file=sys.stderr, flush=True)
            last.update(phase=phase, done=done)

    return report


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    from server.wiring import build_embedder, build_text_embedder

    versions, owner = await _open_versions(settings)
    try:
        if not args.to:
            dropped = await drop_old_versions(versions)
            print(json.dumps({"dropped": dropped}) if args.json else
                  f"dropped: {', '.join(dropped) or 'nothing (only the served version exists)'}")
            return 0
        new_settings = settings.model_copy(update={
            "clip_model": args.to, "clip_pretrained": args.pretrained or settings.clip_pretrained,
        })
        embedder = await asyncio.to_thread(build_embedder, new_settings)
        text_embedder = await asyncio.to_thread(build_text_embedder, new_settings, None)
        if getattr(args, "needs_text_embedder", False) and text_embedder is None:
            raise InvalidInput("backfill-passage needs a text embedder: VLMRAG_TEXT_EMBEDDER is 'none'")
        blobs = build_blob_store(settings)
        try:
            result = await reindex(
                versions, embedder, blobs, switch=not args.no_switch, drop_old=args.drop_old,
                same_model=getattr(args, "same_model", False),
                batch_size=args.batch_size or settings.clip_batch_size,
                max_image_bytes=max(settings.limit_image_bytes, 50 << 20),
                max_image_pixels=settings.limit_image_pixels, progress=_progress_printer(),
                text_embedder=text_embedder, passage_ocr=settings.text_embedder_ocr,
            )
        except StoreUnavailable as exc:
            if owner is None:  # the embedded store
                raise StoreUnavailable(
                    f"{exc.message}. The embedded store belongs to one process: stop `vlmrag serve` and run "
                    "reindex again, or use a Qdrant server (VLMRAG_QDRANT_URL) for re-indexing while serving"
                ) from exc
            raise
        if result.store is not None:
            await versions.release(result.store)
    finally:
        if owner is not None:
            await owner.close()
    if args.json:
        print(json.dumps(result.summary(), indent=2))
        return 0
    print(f"re-indexed: {result.old} -> {result.new} ({result.embedder})")
    print(f"snippets:   {result.copied} embedded, {result.resumed} already there, "
          f"{result.caught_up} caught up, {result.removed} removed, {len(result.skipped)} skipped "
          f"in {result.seconds:.1f} s")
    for line in result.text_only[:20]:
        print(f"  text only (image unreadable): {line}")
    for line in result.skipped[:20]:
        print(f"  skipped: {line}")
    if result.switched:
        print(f"serving:    {result.new} (old version {result.old} kept; remove it with --drop-old)")
        print(f"next:       restart the service with VLMRAG_CLIP_MODEL={args.to} "
              f"VLMRAG_CLIP_PRETRAINED={new_settings.clip_pretrained}")
    else:
        print(f"serving:    {result.old} (built {result.new}; switch with the same command without --no-switch)")
    if result.dropped:
        print(f"dropped:    {', '.join(result.dropped)}")
    return 0
