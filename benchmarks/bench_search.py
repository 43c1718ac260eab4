"""Search latency of the embedded store against a numpy brute-force top-k, in the same run.

For each size N: clustered, L2-normalised 512-d vectors are upserted into Qdrant Edge (through
``EdgeStore``, the adapter the service uses: thread hop and payload decoding included) and the
same matrix is kept in numpy. Each query is timed on both; numpy does ``matrix @ q`` +
``argpartition`` (no payloads). Goal: Edge p50 <= 1.5x numpy at 100k. qdrant-client's local
mode is measured for reference at sizes <= --local-max.

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


def numpy_topk(matrix: np.ndarray, queries: np.ndarray, limit: int) -> list[float]:
    times = []
    for query in queries:
        started = time.perf_counter()
        scores = matrix @ query
        top = np.argpartition(-scores, min(limit, len(scores) - 1))[:limit]
        top[np.argsort(-scores[top])]
        times.append((time.perf_counter() - started) * 1000)
    return times


async def fill(store: VectorStore, matrix: np.ndarray, batch: int = 2000) -> float:
    started = time.perf_counter()
    for start in range(0, len(matrix), batch):
        chunk = matrix[start:start + batch]
        await store.upsert([
            PointRecord(str(uuid.UUID(int=start + i + 1)), {"image": row},  # type: ignore[dict-item]
                        SnippetPayload(kind="image", source=f"s{(start + i) % SOURCES}", tags=["bench"]))
            for i, row in enumerate(chunk)
        ])
    return len(matrix) / (time.perf_counter() - started)


async def time_store(store: VectorStore, queries: np.ndarray, limit: int,
                     filters: SearchFilters | None = None) -> list[float]:
    for query in queries[:5]:  # warm-up: page cache, thread pool
        await store.search("image", query.tolist(), limit, filters)
    times = []
    for query in queries:
        as_list = query.tolist()  # the service holds a list already; not part of the store's cost
        started = time.perf_counter()
        await store.search("image", as_list, limit, filters)
        times.append((time.perf_counter() - started) * 1000)
    return times


async def run(sizes: list[int], n_queries: int, limit: int, local_max: int) -> None:
    rng = np.random.default_rng(0)
    header = (f"{'points':>8} | {'numpy p50/p95 ms':>17} | {'edge p50/p95 ms':>16} | {'edge/numpy p50':>14} | "
              f"{'edge filtered p50':>17} | {'edge upsert pts/s':>17} | {'local-mode p50/p95 ms':>21}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"search top-{limit}, {DIM}-d cosine, {n_queries} queries; edge = exact (no HNSW built); "
          f"{os.cpu_count()} CPUs, load average {load:.1f} at start")
    print(header)
    print("-" * len(header))
    for size in sizes:
        matrix = clustered(size, rng)
        queries = clustered(n_queries, rng)
        base = numpy_topk(matrix, queries, limit)
        with tempfile.TemporaryDirectory() as tmp:
            edge = await open_store(qdrant_url="", api_key="", path=Path(tmp) / "edge", collection="bench")
            await edge.ensure_collection(DIM, "bench")
            rate = await fill(edge, matrix)
            edge_times = await time_store(edge, queries, limit)
            filtered = await time_store(edge, queries, limit, SearchFilters(source="s3"))
            await edge.close()
            local_cell = "-"
            if size <= local_max:
                local = await open_store(qdrant_url=":memory:", api_key="", path=Path(tmp), collection="bench")
                await local.ensure_collection(DIM, "bench")
                await fill(local, matrix)
                lp50, lp95 = percentiles(await time_store(local, queries[: max(20, n_queries // 4)], limit))
                local_cell = f"{lp50:.2f} / {lp95:.2f}"
                await local.close()
        b50, b95 = percentiles(base)
        e50, e95 = percentiles(edge_times)
        f50, _ = percentiles(filtered)
        print(f"{size:>8} | {b50:>7.2f} / {b95:<7.2f} | {e50:>6.2f} / {e95:<7.2f} | {e50 / b50:>13.2f}x | "
              f"{f50:>17.2f} | {rate:>17,.0f} | {local_cell:>21}")


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
