"""Search latency while HNSW is built: in the serving process (Edge's optimize) vs beside it (child process).

One ``EdgeStore`` of N clustered 512-d points (as bench_hnsw.py builds them) answers one search every
``--interval-ms`` from the event loop, as a server would, in three phases measured in the same run:

* ``idle``: no build (the baseline);
* ``in-process optimize``: ``EdgeStore.optimize(HnswParams)`` in a worker thread of this process. Edge
  holds the GIL for the whole build, so searches wait: the worst latency is about the build time;
* ``child-process build``: ``retriever/store/hnsw.py::build_while_serving`` (copy, build in a niced child
  process with every core but one, replay, swap): searches go on, slowed by the shared cores. An upsert
  every second checks that writes go on too (and are replayed).

Then the searches after the swap (now on HNSW). Reported: searches done, p50/p95/max latency, build time.

    python benchmarks/bench_hnsw_serving.py [--size 100000] [--interval-ms 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_hnsw import clustered_with_queries
from benchmarks.bench_search import DIM, fill, percentiles
from retriever.errors import StoreUnavailable
from retriever.store.edge import EdgeStore
from retriever.store.hnsw import HnswParams, build_while_serving, default_build_threads
from retriever.types import PointRecord, SnippetPayload

slowest: list[float] = []  # [seconds into the phase, ms] of the slowest search of the last phase


async def searching(store: EdgeStore, queries: np.ndarray, interval_s: float, stop: asyncio.Event,
                    times: list[float], errors: list[str]) -> None:
    """One search due every ``interval_s`` until ``stop``; latency from when it was due (a frozen loop counts)."""
    i, start = 0, time.perf_counter()
    while not stop.is_set():
        due = start + i * interval_s
        try:
            await store.search("image", queries[i % len(queries)].tolist(), 20)
        except StoreUnavailable as exc:  # the in-process build closes and reloads the shard
            errors.append(exc.message)
        times.append((time.perf_counter() - due) * 1000)
        if times[-1] >= max(times):
            slowest[:] = [due - start, times[-1]]
        i = max(i + 1, int((time.perf_counter() - start) / interval_s))  # searches due while frozen: counted once
        await asyncio.sleep(max(0.0, start + i * interval_s - time.perf_counter()))


async def writing(store: EdgeStore, stop: asyncio.Event, start: int) -> int:
    rng = np.random.default_rng(start)
    written = 0
    while not stop.is_set():
        v = rng.normal(size=DIM).astype(np.float32)
        v /= np.linalg.norm(v)
        await store.upsert([PointRecord(str(uuid.UUID(int=start + written + 1)),
                                        {"image": v.tolist(), "text": v.tolist()}, SnippetPayload(kind="text"))])
        written += 1
        await asyncio.sleep(1.0)
    return written


async def phase(store: EdgeStore, queries: np.ndarray, interval_s: float, work, write_from: int = 0):  # type: ignore[no-untyped-def]
    """Search (and write, when ``write_from``) while ``work()`` runs; (times, seconds, work's result, writes)."""
    stop, times, errors = asyncio.Event(), [], []
    searcher = asyncio.create_task(searching(store, queries, interval_s, stop, times, errors))
    writer = asyncio.create_task(writing(store, stop, write_from)) if write_from else None
    started = time.perf_counter()
    result = await work()
    seconds = time.perf_counter() - started
    stop.set()
    await searcher
    written = await writer if writer else 0
    if errors:
        print(f"  {len(errors)} searches failed, e.g.: {errors[0][-60:]}")
    return times, seconds, result, written


def row(name: str, times: list[float], seconds: float, note: str = "") -> None:
    p50, p95 = percentiles(times)
    print(f"{name:<22} | {len(times):>8} | {seconds:>6.1f} | {p50:>7.2f} | {p95:>7.2f} | {max(times):>9.1f} | {note}"
          + (f" (slowest at {slowest[0]:.1f} s)" if slowest else ""))


async def run(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    hnsw = HnswParams(m=args.m, ef_construct=args.ef_construct)
    beside = HnswParams(m=args.m, ef_construct=args.ef_construct, max_indexing_threads=default_build_threads())
    image, queries = clustered_with_queries(args.size, 200, rng)
    text, _ = clustered_with_queries(args.size, 0, rng)
    interval = args.interval_ms / 1000
    print(f"{args.size} points x 2 vectors of {DIM}-d, a search every {args.interval_ms} ms; HNSW m={hnsw.m} "
          f"ef_construct={hnsw.ef_construct}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    head = f"{'phase':<22} | {'searches':>8} | {'s':>6} | {'p50 ms':>7} | {'p95 ms':>7} | {'max ms':>9} | note"
    print(head + "\n" + "-" * len(head))
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("beside",) if args.beside_only else ("inproc", "beside"):
            store = EdgeStore(Path(tmp) / name, "bench")
            await store.ensure_collection(DIM, "bench")
            await fill(store, image, text)
            times, seconds, _, _ = await phase(store, queries, interval, lambda: asyncio.sleep(args.idle_s))
            row("idle (exact scan)", times, seconds)
            if name == "inproc":
                times, seconds, _, _ = await phase(store, queries, interval, lambda s=store: s.optimize(hnsw))
                row("in-process optimize", times, seconds, "Edge holds the GIL: searches wait for the build")
            else:
                times, seconds, result, written = await phase(
                    store, queries, interval, lambda s=store: build_while_serving(s, beside), write_from=0 if args.no_writes else args.size)
                swap_at = result.seconds - result.swap_seconds
                print(f"  copy ends at {result.copy_seconds:.1f} s, the child at ~{swap_at:.1f} s, the swap at "
                      f"{result.seconds:.1f} s into the phase")
                row("child-process build", times, seconds,
                    f"copy {result.copy_seconds:.1f} s, child build {result.build_seconds:.1f} s, swap "
                    f"{result.swap_seconds:.1f} s; {written} upserts meanwhile, "
                    f"{result.replayed_writes} replayed, {beside.max_indexing_threads} thread(s)")
                store.hnsw_ef = 256
                times, seconds, _, _ = await phase(store, queries, interval, lambda: asyncio.sleep(args.idle_s))
                row("after the swap (HNSW)", times, seconds, "hnsw_ef 256")
            await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--interval-ms", type=float, default=20.0)
    parser.add_argument("--idle-s", type=float, default=10.0, help="length of the idle phases")
    parser.add_argument("--beside-only", action="store_true", help="skip the in-process build")
    parser.add_argument("--no-writes", action="store_true", help="no upserts during the child-process build")
    parser.add_argument("--m", type=int, default=16)
    parser.add_argument("--ef-construct", type=int, default=128)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
