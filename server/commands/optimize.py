"""``vlmrag optimize [--force] [--no-wait] [--json]``: build HNSW for the embedded store.

Qdrant Edge scans every point of its one segment (exact search: ~5 ms at 100k x 512 float16 on two
cores, ~50 ms at 1M). This builds an HNSW graph per dense vector with ``VLMRAG_HNSW_M`` /
``VLMRAG_HNSW_EF_CONSTRUCT`` (18 s per vector at 100k on 2 idle cores, up to ~50 s on a loaded
box; ~33–46 min for both at 1M); the server then searches it with ``VLMRAG_HNSW_EF`` candidates (by size: 0.8 ms instead of 6 ms at
100k, recall@20 0.997 against numpy's exact top-20 on clustered data, see benchmarks/README.md),
and a request can still force the exact scan. Points added later are scanned exactly until the
next build.

* **No server on this data dir:** the build runs here, in place.
* **``vlmrag serve`` holds the store:** the build goes through its API
  (``POST /v1/knowledge-bases/{kb}/optimize``, admin key in ``VLMRAG_API_KEY``): the server builds a
  copy in a child process and swaps it in while it keeps serving (retriever/store/hnsw.py). This
  command waits for it and prints the result (``--no-wait``: return once started). The server also
  does this by itself after ingestions (``VLMRAG_HNSW_AUTO``).

Below ``VLMRAG_HNSW_MIN_POINTS`` points it does nothing unless ``--force``: the exact scan is fast
enough there. With a Qdrant server (``VLMRAG_QDRANT_URL``) there is nothing to do: it builds HNSW
itself.

``--json`` prints ``{"store", "points", "built": bool, "seconds", "m", "ef_construct",
"indexed_vectors", "segments", "reason", "via"}`` (``via``: ``local`` or the server's URL).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import httpx

from retriever.errors import Conflict, InvalidInput, NotFound, StoreUnavailable
from retriever.store.edge import EdgeStore, HnswParams, check_not_locked
from server.settings import Settings


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "optimize", help="Build HNSW for the embedded store (through the server when one holds it).",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--force", action="store_true", help="Build even below VLMRAG_HNSW_MIN_POINTS points.")
    parser.add_argument("--no-wait", action="store_true",
                        help="Through a running server: return once the build has started.")
    parser.add_argument("--json", action="store_true", help="Machine-readable summary (keys above).")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    result = asyncio.run(optimize_store(settings, force=args.force, wait=not getattr(args, "no_wait", False)))
    if args.json:
        print(json.dumps(result))
    elif result["built"]:
        print(f"built HNSW (m={result['m']}, ef_construct={result['ef_construct']}) for {result['points']} points "
              f"of {result['store']} in {result['seconds']:.1f} s: {result['indexed_vectors']} vectors indexed, "
              f"{result['segments']} segments")
    elif result.get("state") == "running":
        print(f"HNSW build of {result['store']} started by the server at {result['via']}; "
              f"`vlmrag optimize` again (or GET /v1/knowledge-bases/KB/optimize) shows how it went")
    else:
        print(f"nothing done: {result['reason']}")
    return 0


async def optimize_store(settings: Settings, *, force: bool = False, wait: bool = True,
                         poll_s: float = 1.0) -> dict[str, Any]:
    """Build HNSW for the configured embedded store: here, or through the server that holds it."""
    hnsw = HnswParams(m=settings.hnsw_m, ef_construct=settings.hnsw_ef_construct)
    result: dict[str, Any] = {"store": "", "points": 0, "built": False, "seconds": 0.0, "m": hnsw.m,
                              "ef_construct": hnsw.ef_construct, "indexed_vectors": 0, "segments": 0, "reason": "",
                              "via": "local"}
    if settings.qdrant_url.strip():
        result.update(store=settings.qdrant_url, reason="a Qdrant server builds HNSW itself")
        return result
    path = Path(settings.embedded_store_path)
    try:
        check_not_locked(path, settings.collection)
    except StoreUnavailable as exc:
        from server.commands.ingest import find_running_server

        url = find_running_server(settings.data_dir)
        if url is None:
            raise StoreUnavailable(f"{exc.message}; stop the process that holds it, or optimize through "
                                   "the vlmrag server that does") from exc
        return await _through_server(url, settings, result, force=force, wait=wait, poll_s=poll_s)
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


async def _through_server(url: str, settings: Settings, result: dict[str, Any], *, force: bool, wait: bool,
                          poll_s: float) -> dict[str, Any]:
    """Start the build on the server holding the store and (``wait``) follow it to its end."""
    from server.commands.ingest import API_KEY_ENV
    from server.knowledge_bases import kb_of

    kb = kb_of(settings)
    headers = {"Authorization": f"Bearer {key}"} if (key := os.environ.get(API_KEY_ENV)) else {}
    path = f"/v1/knowledge-bases/{kb}/optimize"
    result.update(store=f"knowledge base {kb}", via=url)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=httpx.Timeout(30.0, connect=5.0)) as client:
        try:
            response = await client.post(path, json={"force": force})
            body = _checked(response)
            while wait and body["state"] == "running":
                await asyncio.sleep(poll_s)
                body = _checked(await client.get(path))
        except httpx.HTTPError as exc:
            raise StoreUnavailable(f"vlmrag server at {url} did not answer: {exc}") from exc
    index = body.get("index") or {}
    build = body.get("result") or {}
    result.update(state=body["state"], points=index.get("points", body.get("points", 0)),
                  indexed_vectors=index.get("indexed_vectors", 0), segments=index.get("segments", 0),
                  built=body["state"] == "done", seconds=build.get("seconds", 0.0), reason=body.get("reason", ""))
    if body["state"] == "failed":
        raise StoreUnavailable(f"the HNSW build on {url} failed: {body.get('reason')}")
    return result


def _checked(response: httpx.Response) -> dict[str, Any]:
    if response.status_code in (401, 403):
        raise InvalidInput(f"the server refused the build ({response.status_code}): set VLMRAG_API_KEY to an "
                           "admin key bound to this knowledge base")
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        error = {404: NotFound, 409: Conflict}.get(response.status_code, StoreUnavailable)
        raise error(f"the server answered {response.status_code}: {message}")
    return response.json()
