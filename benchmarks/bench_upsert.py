"""Where ``EdgeStore.upsert`` spends its time (qdrant-edge-py 0.9.0): Python->Rust conversion vs the update.

``python benchmarks/bench_upsert.py [--points 2000] [--reps 5]`` builds ``qe.Point`` objects the way
``retriever/store/edge.py`` does, timing each part in CPU time of the calling thread (robust on a
loaded machine, unlike wall time), then times ``EdgeStore.upsert`` end to end (wall). Every row's
ratio is against the cheapest baseline measured in the same run: a Point with a 512-d float list
and no payload. The "packed" payload row (indexed fields + the rest as one JSON string) is an
option measured for reference, not what the store writes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import qdrant_edge as qe

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retriever.store.base import KEYWORD_FIELDS
from retriever.store.edge import EdgeStore
from retriever.types import PointRecord, SnippetPayload

DIM = 512


def realistic(i: int) -> SnippetPayload:
    """A captioned image snippet as the ingest pipeline writes it."""
    return SnippetPayload(
        kind="image_text", text="a wiring diagram of the pump", source=f"manuals/p{i % 10}.pdf", tags=["manuals"],
        content_hash=f"{i:064x}", image_ref="ab/" + "c" * 62 + ".png", thumb_ref="cd/" + "e" * 62 + ".jpg", page=3,
        created_at="2024-01-01T00:00:00+00:00",
        extra={"image": {"format": "PNG", "media_type": "image/png", "width": 640, "height": 480, "bytes": 123456}},
    )


def minimal(i: int) -> SnippetPayload:
    """What bench_search.py upserts: kind, source, tag, every other field at its default."""
    return SnippetPayload(kind="image", source=f"s{i % 10}", tags=["bench"])


def packed(payload: SnippetPayload) -> dict[str, Any]:
    data = payload.to_dict()
    return {**{k: data[k] for k in KEYWORD_FIELDS}, "doc": json.dumps({k: v for k, v in data.items()
                                                                      if k not in KEYWORD_FIELDS})}


def cpu_us(fn: Callable[[], object], n: int, reps: int) -> float:
    """Median CPU time of the calling thread per item, in µs."""
    samples = []
    for _ in range(reps):
        started = time.thread_time()
        fn()
        samples.append((time.thread_time() - started) * 1e6 / n)
    return statistics.median(samples)


def new_shard() -> qe.EdgeShard:
    vectors = {name: qe.EdgeVectorParams(size=DIM, distance=qe.Distance.Cosine) for name in ("image", "text")}
    shard = qe.EdgeShard.create(tempfile.mkdtemp(prefix="bench-upsert-"), qe.EdgeConfig(vectors=vectors))
    for field in KEYWORD_FIELDS:
        shard.update(qe.UpdateOperation.create_field_index(field, qe.PayloadSchemaType.Keyword))
    return shard


def update_cpu_us(points: list[qe.Point], reps: int) -> float:
    samples = []
    for _ in range(reps):
        shard = new_shard()
        started = time.thread_time()
        shard.update(qe.UpdateOperation.upsert_points(points))
        samples.append((time.thread_time() - started) * 1e6 / len(points))
        shard.close()
    return statistics.median(samples)


async def store_rate(matrix: np.ndarray, make_payload: Callable[[int], SnippetPayload], batch: int = 500) -> float:
    store = EdgeStore(Path(tempfile.mkdtemp(prefix="bench-upsert-")), "bench")
    await store.ensure_collection(DIM, "bench")
    records = [PointRecord(str(uuid.UUID(int=i + 1)), {"image": row.tolist()}, make_payload(i))
               for i, row in enumerate(matrix)]
    started = time.perf_counter()
    for start in range(0, len(records), batch):
        await store.upsert(records[start:start + batch])
    rate = len(records) / (time.perf_counter() - started)
    await store.close()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=2000)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    n, reps = args.points, args.reps
    matrix = np.random.default_rng(0).normal(size=(n, DIM)).astype(np.float32)
    ids = [str(uuid.UUID(int=i + 1)) for i in range(n)]
    lists = [row.tolist() for row in matrix]
    full = [realistic(i).to_dict() for i in range(n)]
    small = [minimal(i).to_dict() for i in range(n)]
    packs = [packed(realistic(i)) for i in range(n)]
    base = cpu_us(lambda: [qe.Point(ids[k], {"image": lists[k]}) for k in range(n)], n, reps)
    rows = [
        ("Point, 512-d list, no payload (baseline)", base),
        ("Point, ndarray.tolist() + list", cpu_us(lambda: [qe.Point(ids[k], {"image": matrix[k].tolist()})
                                                           for k in range(n)], n, reps)),
        # memoryview / ndarray: accepted as sequences (outside the stubs' types), converted per float.
        ("Point, memoryview(ndarray row)", cpu_us(lambda: [qe.Point(ids[k], {"image": memoryview(matrix[k])})  # type: ignore[dict-item]
                                                           for k in range(n)], n, reps)),
        ("Point, ndarray row", cpu_us(lambda: [qe.Point(ids[k], {"image": matrix[k]}) for k in range(n)], n, reps)),
        ("Point + minimal payload (bench_search)", cpu_us(lambda: [qe.Point(ids[k], {"image": lists[k]}, small[k])
                                                                   for k in range(n)], n, reps)),
        ("Point + realistic payload", cpu_us(lambda: [qe.Point(ids[k], {"image": lists[k]}, full[k])
                                                      for k in range(n)], n, reps)),
        ("Point + realistic payload, packed (option)", cpu_us(lambda: [qe.Point(ids[k], {"image": lists[k]}, packs[k])
                                                                       for k in range(n)], n, reps)),
        ("shard.update, realistic payload", update_cpu_us([qe.Point(ids[k], {"image": lists[k]}, full[k])
                                                           for k in range(n)], reps)),
        ("shard.update, no payload", update_cpu_us([qe.Point(ids[k], {"image": lists[k]}) for k in range(n)], reps)),
    ]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"qdrant-edge upsert breakdown, {n} points x {DIM}-d, median of {reps}; {os.cpu_count()} CPUs, "
          f"load average {load:.1f}")
    print(f"{'part (CPU of the calling thread)':45} | {'µs/point':>9} | {'x baseline':>10}")
    print("-" * 71)
    for label, value in rows:
        print(f"{label:45} | {value:9.1f} | {value / base:9.2f}x")
    print()
    print(f"{'EdgeStore.upsert, batches of 500 (wall)':45} | {'points/s':>9} | {'x minimal':>10}")
    print("-" * 71)
    rate_min = asyncio.run(store_rate(matrix, minimal))
    rate_real = asyncio.run(store_rate(matrix, realistic))
    print(f"{'minimal payload':45} | {rate_min:9,.0f} | {1.0:9.2f}x")
    print(f"{'realistic payload':45} | {rate_real:9,.0f} | {rate_real / rate_min:9.2f}x")


if __name__ == "__main__":
    main()
