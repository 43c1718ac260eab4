"""``vlmrag optimize [--force] [--json]``: build HNSW for the embedded store, offline.

Qdrant Edge scans every point of its one segment (exact search: ~5 ms at 100k x 512 float16 on two
cores, ~50 ms at 1M). This builds an HNSW graph per dense vector with ``VLMRAG_HNSW_M`` /
``VLMRAG_HNSW_EF_CONSTRUCT`` (18 s per vector at 100k on 2 idle cores, up to ~50 s on a loaded
box); the server then searches it with ``VLMRAG_HNSW_EF`` candidates (0.8 ms instead of 6 ms at
100k, recall@20 0.997 against numpy's exact top-20 on clustered data, see benchmarks/README.md),
and a request can still force the exact scan. Points
added later are scanned exactly until the next ``vlmrag optimize``.

The build holds the GIL for its whole run, so it is never run inside ``vlmrag serve``, and the
embedded store belongs to one process: stop the server, optimize, start it again (a few seconds of
downtime, the start-up). Below ``VLMRAG_HNSW_MIN_POINTS`` points it does nothing unless ``--force``:
the exact scan is fast enough there. With a Qdrant server (``VLMRAG_QDRANT_URL``) there is nothing to
do: the server builds HNSW itself.

``--json`` prints ``{"store", "points", "built": bool, "seconds", "m", "ef_construct",
"indexed_vectors", "segments", "reason"}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from retriever.errors import NotFound, StoreUnavailable
from retriever.store.edge import EdgeStore, HnswParams, check_not_locked
from server.settings import Settings


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "optimize", help="Build HNSW for the embedded store (offline: stop vlmrag serve first).",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--force", action="store_true", help="Build even below VLMRAG_HNSW_MIN_POINTS points.")
    parser.add_argument("--json", action="store_true", help="Machine-readable summary (keys above).")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    result = asyncio.run(optimize_store(settings, force=args.force))
    if args.json:
        print(json.dumps(result))
    elif result["built"]:
        print(f"built HNSW (m={result['m']}, ef_construct={result['ef_construct']}) for {result['points']} points "
              f"of {result['store']} in {result['seconds']:.1f} s: {result['indexed_vectors']} vectors indexed, "
              f"{result['segments']} segments")
    else:
        print(f"nothing done: {result['reason']}")
    return 0


async def optimize_store(settings: Settings, *, force: bool = False) -> dict[str, Any]:
    """Build HNSW for the configured embedded store (the CLI's work; no model is loaded)."""
    hnsw = HnswParams(m=settings.hnsw_m, ef_construct=settings.hnsw_ef_construct)
    result: dict[str, Any] = {"store": "", "points": 0, "built": False, "seconds": 0.0, "m": hnsw.m,
                              "ef_construct": hnsw.ef_construct, "indexed_vectors": 0, "segments": 0, "reason": ""}
    if settings.qdrant_url.strip():
        result.update(store=settings.qdrant_url, reason="a Qdrant server builds HNSW itself")
        return result
    path = Path(settings.embedded_store_path)
    try:
        check_not_locked(path, settings.collection)
    except StoreUnavailable as exc:
        raise StoreUnavailable(f"{exc.message}; stop `vlmrag serve`, run `vlmrag optimize`, start it again") from exc
    store = EdgeStore(path, settings.collection)
    await store.open()
    try:
        result["store"] = store.description
        info = await store.index_info()
        if not info["segments"]:
            raise NotFound(f"collection {settings.collection!r} does not exist in {path}; ingest first")
        result.update(points=info["points"], indexed_vectors=info["indexed_vectors"], segments=info["segments"])
        if info["points"] < settings.hnsw_min_points and not force:
            result["reason"] = (f"{info['points']} points < VLMRAG_HNSW_MIN_POINTS={settings.hnsw_min_points}: "
                                "the exact scan is fast enough (--force builds anyway)")
            return result
        started = time.perf_counter()
        await store.optimize(hnsw)
        result["seconds"] = round(time.perf_counter() - started, 2)
        info = await store.index_info()
        result.update(built=True, indexed_vectors=info["indexed_vectors"], segments=info["segments"])
        return result
    finally:
        await store.close()
