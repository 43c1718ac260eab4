"""Embedded store: exact scan vs HNSW (``vlmrag optimize``), p50/p95 and recall@k, with the build time.

For each size N: clustered, L2-normalised 512-d ``image`` and ``text`` vectors (64 centres; the
queries are drawn around the same centres, as a question about something in the knowledge base
is) are upserted through ``EdgeStore``; then, in the same run, a numpy float32 brute-force top-k
(the floor), Edge's exact scan (``search(..., exact=True)``), ``EdgeStore.optimize(HnswParams)``
(timed) and HNSW searches at several ``hnsw_ef``. Recall is the share of numpy's exact top-k
found. Goals (issue 14): recall@20 >= 0.99, HNSW p50 <= 0.5x numpy at 1M.

    python benchmarks/bench_hnsw.py [--sizes 100000] [--queries 200] [--limit 20] [--m 16] [--ef-construct 128]
        [--ef 64,128,256] [--keep DIR | --reuse DIR]

The build takes long at 1M (46 min on the loaded 2-core box): ``--keep DIR`` keeps the built store
under ``DIR/<size>``, and ``--reuse DIR`` times more ``--ef`` values on it without filling or building
again (the points and queries come from the same seed).
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

from benchmarks.bench_search import DIM, fill, numpy_topk, percentiles
from retriever.store.edge import EdgeStore, HnswParams


def clustered_with_queries(n: int, n_queries: int, rng: np.random.Generator,
                           clusters: int = 64, dim: int = DIM) -> tuple[np.ndarray, np.ndarray]:
    """Points and queries around the same random centres, unit length."""
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    rows = centres[rng.integers(0, clusters, n + n_queries)] + 0.6 * rng.normal(size=(n + n_queries, dim)).astype(
        np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows[:n], rows[n:]


async def timed(store: EdgeStore, queries: np.ndarray, limit: int, *, exact: bool) -> tuple[list[float], list[set]]:
    for query in queries[:5]:
        await store.search("image", query.tolist(), limit, exact=exact)
    times, tops = [], []
    for query in queries:
        as_list = query.tolist()
        started = time.perf_counter()
        hits = await store.search("image", as_list, limit, exact=exact)
        times.append((time.perf_counter() - started) * 1000)
        tops.append({uuid.UUID(hit.id).int - 1 for hit in hits})
    return times, tops


def recall(found: list[set], exact: list[set]) -> float:
    return statistics.mean(len(f & e) / len(e) for f, e in zip(found, exact, strict=True))


async def run(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    hnsw = HnswParams(m=args.m, ef_construct=args.ef_construct)
    efs = [int(e) for e in args.ef.split(",")]
    print(f"top-{args.limit} of {DIM}-d cosine, {args.queries} queries, HNSW m={hnsw.m} "
          f"ef_construct={hnsw.ef_construct} over 2 vectors; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    header = (f"{'points':>8} | {'search':<16} | {'p50 ms':>7} | {'p95 ms':>7} | {'/numpy p50':>10} | "
              f"{'recall@k':>8} | {'note':<30}")
    print(header)
    print("-" * len(header))
    for size in args.sizes:
        image, queries = clustered_with_queries(size, args.queries, rng)
        text, _ = clustered_with_queries(size, 0, rng)
        base, exact_tops = zip(*(numpy_topk(image, q, args.limit) for q in queries), strict=True)
        floor = percentiles(list(base))[0]

        def row(name: str, times: list[float], tops: list[set], note: str = "", size: int = size,
                floor: float = floor, exact_tops: tuple[set, ...] = exact_tops) -> None:
            p50, p95 = percentiles(times)
            print(f"{size:>8} | {name:<16} | {p50:>7.2f} | {p95:>7.2f} | {p50 / floor:>9.2f}x | "
                  f"{recall(tops, list(exact_tops)):>8.3f} | {note:<30}")

        row("numpy float32", list(base), list(exact_tops), "brute-force floor, all cores")
        with tempfile.TemporaryDirectory() as tmp:
            where = Path(args.reuse or args.keep or tmp) / str(size)
            store = EdgeStore(where, "bench")
            if args.reuse:
                await store.open()
                info = await store.index_info()
                times, tops = await timed(store, queries, args.limit, exact=True)
                row("edge exact=True", times, tops, f"reused {where}, {info['indexed_vectors']} vectors indexed")
            else:
                await store.ensure_collection(DIM, "bench")
                rate = await fill(store, image, text)
                times, tops = await timed(store, queries, args.limit, exact=True)
                row("edge exact", times, tops, f"before optimize; {rate:,.0f} upserts/s")
                started = time.perf_counter()
                await store.optimize(hnsw)
                built = time.perf_counter() - started
                info = await store.index_info()
                times, tops = await timed(store, queries, args.limit, exact=True)
                row("edge exact=True", times, tops, f"optimize {built:.1f} s, {info['segments']} segments")
            for ef in efs:
                store.hnsw_ef = ef
                times, tops = await timed(store, queries, args.limit, exact=False)
                row(f"edge hnsw ef={ef}", times, tops)
            await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000", type=lambda s: [int(x) for x in s.split(",") if x.strip()])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--m", type=int, default=16)
    parser.add_argument("--ef-construct", type=int, default=128)
    parser.add_argument("--ef", default="64,128,256", help="comma-separated hnsw_ef values to time")
    parser.add_argument("--keep", help="keep the built stores under this folder (one per size)")
    parser.add_argument("--reuse", help="time the stores kept by --keep there: no fill, no build")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
