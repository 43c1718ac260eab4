"""Search latency of the embedded store against a numpy brute-force top-k, in the same run.

For each size N: points shaped like ingested snippets (clustered, L2-normalised 512-d ``image``
and ``text`` vectors, a payload with a ~300-character text) are upserted into Qdrant Edge
(through ``EdgeStore``, the adapter the service uses: its float16 vector storage, request
building and payload decoding included) and the ``image`` matrix is kept in numpy (float32).
Each query is timed on both; numpy does ``matrix @ q`` + ``argpartition`` (no payloads; BLAS
may use every core, while Edge scans its one appendable segment on one thread). ``recall`` is
the share of numpy's exact float32 top-k that Edge returns. Goal: Edge p50 <= 1.5x numpy at
100k. qdrant-client's local mode is measured for reference at sizes <= --local-max.

    python benchmarks/bench_search.py [--sizes 1000,10000,100000] [--queries 200] [--limit 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retriever.store import open_store
from retriever.store.base import VectorStore
from retriever.store.edge import VECTOR_DATATYPE
from retriever.types import PointRecord, SearchFilters, SnippetPayload

DIM = 512
SOURCES = 10  # a source filter keeps ~10% of the points


def clustered(n: int, rng: np.random.Generator, clusters: int = 64) -> np.ndarray:
    """Unit vectors around random centres (CLIP embeddings are clustered, not uniform)."""
    centres = rng.normal(size=(clusters, DIM)).astype(np.float32)
    vectors = centres[rng.integers(0, clusters, n)] + 0.6 * rng.normal(size=(n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def numpy_topk(matrix: np.ndarray, query: np.ndarray, limit: int) -> tuple[float, set[int]]:
    """One exact top-k: its time in ms and its row indices."""
    started = time.perf_counter()
    scores = matrix @ query
    top = np.argpartition(-scores, min(limit, len(scores) - 1))[:limit]
    top = top[np.argsort(-scores[top])]
    return (time.perf_counter() - started) * 1000, {int(i) for i in top}


def snippet(n: int) -> SnippetPayload:
    """A payload the size of an ingested image+caption snippet (text, hash, blob refs, date)."""
    return SnippetPayload(
        kind="image_text", text=f"snippet {n}: " + "a caption or passage of ordinary length " * 7,
        source=f"s{n % SOURCES}", tags=["bench"], content_hash=f"{n:064x}", image_ref=f"blobs/{n:032x}",
        thumb_ref=f"thumbs/{n:032x}", page=n % 50, created_at="2024-01-01T00:00:00Z",
    )


async def fill(store: VectorStore, image: np.ndarray, text: np.ndarray, batch: int = 2000) -> float:
    """Upsert row n of both matrices as point n (id ``UUID(int=n + 1)``); returns points per second."""
    started = time.perf_counter()
    for start in range(0, len(image), batch):
        await store.upsert([
            PointRecord(str(uuid.UUID(int=n + 1)), {"image": image[n], "text": text[n]},  # type: ignore[dict-item]
                        snippet(n))
            for n in range(start, min(start + batch, len(image)))
        ])
    return len(image) / (time.perf_counter() - started)


async def time_store(store: VectorStore, queries: np.ndarray, limit: int,
                     filters: SearchFilters | None = None) -> tuple[list[float], list[set[int]]]:
    """Times (ms) of ``store.search`` on the image vector, and each result's row indices."""
    for query in queries[:5]:  # warm-up: page cache, thread pool
        await store.search("image", query.tolist(), limit, filters)
    times, tops = [], []
    for query in queries:
        as_list = query.tolist()  # the service holds a list already; not part of the store's cost
        started = time.perf_counter()
        hits = await store.search("image", as_list, limit, filters)
        times.append((time.perf_counter() - started) * 1000)
        tops.append({uuid.UUID(hit.id).int - 1 for hit in hits})
    return times, tops


def recall(found: list[set[int]], exact: list[set[int]]) -> float:
    """Mean share of the exact top-k present in the store's top-k."""
    return statistics.mean(len(f & e) / len(e) for f, e in zip(found, exact, strict=True))


async def run(sizes: list[int], n_queries: int, limit: int, local_max: int) -> None:
    rng = np.random.default_rng(0)
    header = (f"{'points':>8} | {'numpy p50/p95 ms':>17} | {'edge p50/p95 ms':>16} | {'edge/numpy p50':>14} | "
              f"{'recall':>6} | {'edge filtered p50':>17} | {'edge upsert pts/s':>17} | "
              f"{'local-mode p50/p95 ms':>21}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    datatype = str(VECTOR_DATATYPE).rsplit(".", 1)[-1].lower()  # the enum has no .name
    print(f"search top-{limit}, {DIM}-d cosine, {n_queries} queries; edge = exact scan (no HNSW built) of "
          f"{datatype} vectors, numpy = float32; {os.cpu_count()} CPUs, load average {load:.1f} at start")
    print(header)
    print("-" * len(header))
    for size in sizes:
        matrix = clustered(size, rng)
        text = clustered(size, rng)
        queries = clustered(n_queries, rng)
        # A separate, tight numpy pass (its best case: matrix hot in cache, BLAS threads awake); the
        # goal is defined against it. Interleaving it with Edge query by query made numpy ~10 % slower.
        base, exact = zip(*(numpy_topk(matrix, query, limit) for query in queries), strict=True)
        with tempfile.TemporaryDirectory() as tmp:
            edge = await open_store(qdrant_url="", api_key="", path=Path(tmp) / "edge", collection="bench")
            await edge.ensure_collection(DIM, "bench")
            rate = await fill(edge, matrix, text)
            edge_times, found = await time_store(edge, queries, limit)
            filtered, _ = await time_store(edge, queries, limit, SearchFilters(source="s3"))
            await edge.close()
            local_cell = "-"
            if size <= local_max:
                local = await open_store(qdrant_url=":memory:", api_key="", path=Path(tmp), collection="bench")
                await local.ensure_collection(DIM, "bench")
                await fill(local, matrix, text)
                lp50, lp95 = percentiles((await time_store(local, queries[: max(20, n_queries // 4)], limit))[0])
                local_cell = f"{lp50:.2f} / {lp95:.2f}"
                await local.close()
        b50, b95 = percentiles(list(base))
        e50, e95 = percentiles(edge_times)
        f50, _ = percentiles(filtered)
        print(f"{size:>8} | {b50:>7.2f} / {b95:<7.2f} | {e50:>6.2f} / {e95:<7.2f} | {e50 / b50:>13.2f}x | "
              f"{recall(found, list(exact)):>6.3f} | {f50:>17.2f} | {rate:>17,.0f} | {local_cell:>21}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000", help="comma-separated point counts")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--limit", type=int, default=20, help="top-k (the retrieval pool)")
    parser.add_argument("--local-max", type=int, default=10_000, help="largest size run on qdrant-client local mode")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    asyncio.run(run(sizes, args.queries, args.limit, args.local_max))


if __name__ == "__main__":
    main()
