"""HNSW for the embedded store: the build parameters, and building it while the server keeps serving.

Qdrant Edge 0.9.0's ``optimize()`` holds the GIL for its whole run (18 s per vector at 100k x 512 on
two idle cores), so it cannot run in the serving process. ``build_while_serving`` therefore:

1. copies the served shard to ``<collection>__optimizing`` (writes paused for the copy only; reads go
   on) and from then on journals every write the store applies (``EdgeStore.snapshot_to``);
2. builds the graphs in a child process (``python -m retriever.store.hnsw DIR ...``, its own GIL,
   niced, ``threads`` indexing threads) on the copy;
3. renames the copy to the next version name (``<collection>__vN``, as ``reindex`` names them), loads
   it, replays the journal on it, points ``<collection>__current`` at it (``os.replace``, atomic) and
   swaps it in under the write lock (``EdgeStore.adopt``); the old shard is closed a moment later,
   once in-flight reads are done, and its directory removed (it held the same points).

A failed or cancelled build (child killed) removes the copy and drops the journal: the served shard
was never touched. A crash of the whole server leaves ``__optimizing`` behind, removed by the next
build. The offline path (``vlmrag optimize`` with no server) builds in place: ``EdgeStore.optimize``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import qdrant_edge as qe

from retriever.errors import StoreUnavailable
from retriever.store.base import version_name, version_number

if TYPE_CHECKING:
    from retriever.store.edge import EdgeStore

log = logging.getLogger(__name__)

#: The config Edge persists beside a shard's segments (also the marker that a directory is a shard).
SHARD_CONFIG_FILE = "edge_config.json"
BUILD_DIR_SUFFIX = "__optimizing"
_DISTANCES = {"Cosine": qe.Distance.Cosine, "Dot": qe.Distance.Dot, "Euclid": qe.Distance.Euclid,
              "Manhattan": qe.Distance.Manhattan}
_DATATYPES = {"float16": qe.VectorStorageDatatype.Float16, "float32": qe.VectorStorageDatatype.Float32,
              "uint8": qe.VectorStorageDatatype.Uint8}


@dataclass(frozen=True, slots=True)
class HnswParams:
    """How HNSW is built (Qdrant's names; sizes in KB as Qdrant counts them)."""

    m: int = 16  # edges per node
    ef_construct: int = 128  # candidates while building
    full_scan_threshold_kb: int = 10_000  # a segment smaller than this is scanned, not walked
    max_indexing_threads: int = 0  # 0 = every core

    def config(self) -> qe.HnswIndexConfig:
        return qe.HnswIndexConfig(m=self.m, ef_construct=self.ef_construct,
                                  full_scan_threshold=self.full_scan_threshold_kb,
                                  max_indexing_threads=self.max_indexing_threads)

    def cli_args(self) -> list[str]:
        return ["--m", str(self.m), "--ef-construct", str(self.ef_construct),
                "--full-scan-kb", str(self.full_scan_threshold_kb), "--threads", str(self.max_indexing_threads)]


def hnsw_shard_config(shard_dir: Path, hnsw: HnswParams) -> qe.EdgeConfig:
    """The shard's persisted vectors plus an HNSW config and an indexing threshold that indexes every segment.

    Edge has no config getter and refuses a config without vectors, so the persisted
    ``edge_config.json`` is read back into the same parameters.
    """
    persisted = json.loads((shard_dir / SHARD_CONFIG_FILE).read_text(encoding="utf-8"))
    vectors = {
        name: qe.EdgeVectorParams(size=int(v["size"]), distance=_DISTANCES[v.get("distance", "Cosine")],
                                  datatype=_DATATYPES.get(str(v.get("datatype", "float32")).lower()),
                                  multivector_config=qe.MultiVectorConfig(comparator=qe.MultiVectorComparator.MaxSim)
                                  if v.get("multivector_config") else None)  # ``passage`` sections: max_sim is the only one
        for name, v in (persisted.get("vectors") or {}).items()
    }
    sparse = {
        name: qe.EdgeSparseVectorParams(
            modifier=qe.Modifier.Idf if str(v.get("modifier", "")).lower() == "idf" else None)
        for name, v in (persisted.get("sparse_vectors") or {}).items()
    }
    return qe.EdgeConfig(vectors=vectors, sparse_vectors=sparse or None, hnsw_config=hnsw.config(),
                         optimizers=qe.EdgeOptimizersConfig(indexing_threshold=1))


def build_in_place(shard_dir: Path, hnsw: HnswParams) -> dict[str, int]:
    """Load a closed shard with ``hnsw``, build every graph, close it; ``points``/``segments``/``indexed_vectors``."""
    shard = qe.EdgeShard.load(str(shard_dir), hnsw_shard_config(shard_dir, hnsw))
    try:
        shard.optimize()
        info = shard.info()
        return {"points": int(info.points_count), "segments": int(info.segments_count),
                "indexed_vectors": int(info.indexed_vectors_count)}
    finally:
        shard.close()


def auto_hnsw_ef(points: int) -> int:
    """The search beam for a graph of ``points`` points when ``VLMRAG_HNSW_EF`` is 0 (by size).

    Measured on clustered 512-d data (benchmarks/bench_hnsw.py, recall@20 against exact top-20): at 100k,
    ef 256 gives 0.997 in 0.8 ms; at 1M, 256 gives only 0.946, 512 0.986, 1024 0.995 (6.1 ms, 0.08x the
    numpy scan) and 2048 0.998. So 256 up to 100k, then growing as points^0.6 (1019 at 1M), at most 2048.
    """
    if points <= 100_000:
        return 256
    return int(min(2048, 256 * (points / 100_000) ** 0.6))


def default_build_threads() -> int:
    """Indexing threads for a build beside a serving process: every core but one."""
    return max(1, (os.cpu_count() or 2) - 1)


def next_version_name(path: Path, collection: str) -> str:
    """``<collection>__vN`` one above every version present (the plain name counts as 1)."""
    numbers = [version_number(collection, p.name) or 0 for p in path.iterdir() if p.is_dir()] if path.is_dir() else []
    return version_name(collection, max(numbers + [1]) + 1)


@dataclass(slots=True)
class BuildResult:
    points: int = 0
    segments: int = 0
    indexed_vectors: int = 0
    seconds: float = 0.0  # the whole run: copy, build, replay, swap
    copy_seconds: float = 0.0  # the snapshot (writes paused)
    build_seconds: float = 0.0  # the child's graph build alone
    swap_seconds: float = 0.0  # load the copy, replay, switch (writes paused)
    replayed_writes: int = 0  # writes applied to the old shard during the build, replayed on the new one
    shard: str = ""  # the directory now served

    def to_dict(self) -> dict[str, Any]:
        return {"points": self.points, "segments": self.segments, "indexed_vectors": self.indexed_vectors,
                "seconds": round(self.seconds, 2), "copy_seconds": round(self.copy_seconds, 2),
                "build_seconds": round(self.build_seconds, 2), "swap_seconds": round(self.swap_seconds, 2),
                "replayed_writes": self.replayed_writes, "shard": self.shard}


async def build_while_serving(store: EdgeStore, hnsw: HnswParams, *, nice: int = 10,
                              python: str = sys.executable) -> BuildResult:
    """Build HNSW for the open ``store`` in a child process on a copy, then swap the copy in (module doc)."""
    started = time.perf_counter()
    work = store.path / f"{store.collection}{BUILD_DIR_SUFFIX}"
    await asyncio.to_thread(shutil.rmtree, work, True)  # a crashed build's leftovers
    proc: asyncio.subprocess.Process | None = None
    adopted = False
    try:
        await store.snapshot_to(work)
        copied = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            python, "-m", "retriever.store.hnsw", str(work), *hnsw.cli_args(), "--nice", str(nice),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            tail = err.decode("utf-8", "replace").strip().splitlines()[-3:]
            raise StoreUnavailable(f"HNSW build of {store.collection} failed (exit {proc.returncode}): "
                                   f"{' | '.join(tail) or 'no output'}")
        child = json.loads(out.decode("utf-8").strip().splitlines()[-1])
        target = store.path / next_version_name(store.path, store.collection)
        await asyncio.to_thread(os.rename, work, target)
        work = target
        # The swap is never cut short: cancelled half-way, the pointer could name a removed directory.
        swapping = time.perf_counter()
        swap = asyncio.ensure_future(store.adopt(target))
        try:
            replayed = await asyncio.shield(swap)
        except asyncio.CancelledError:
            await asyncio.gather(swap, return_exceptions=True)
            adopted = swap.exception() is None  # swapped in: it serves now, so it stays
            raise
        adopted = True
        info = await store.index_info()
        done = time.perf_counter()
        return BuildResult(points=info["points"], segments=info["segments"], indexed_vectors=info["indexed_vectors"],
                           seconds=done - started, copy_seconds=copied - started, build_seconds=float(child["seconds"]),
                           swap_seconds=done - swapping, replayed_writes=replayed, shard=target.name)
    finally:
        if proc is not None and proc.returncode is None:  # cancelled: stop the child too
            proc.kill()
            await proc.wait()
        if not adopted:
            store.discard_journal()
            await asyncio.to_thread(shutil.rmtree, work, True)


def main(argv: list[str] | None = None) -> int:
    """The child: build HNSW in place on a closed shard copy and print one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m retriever.store.hnsw", description=main.__doc__)
    parser.add_argument("shard_dir", type=Path)
    parser.add_argument("--m", type=int, default=16)
    parser.add_argument("--ef-construct", type=int, default=128)
    parser.add_argument("--full-scan-kb", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--nice", type=int, default=0, help="Lower this process's priority (serving comes first).")
    args = parser.parse_args(argv)
    if args.nice:
        os.nice(args.nice)
    started = time.perf_counter()
    info = build_in_place(args.shard_dir, HnswParams(m=args.m, ef_construct=args.ef_construct,
                                                     full_scan_threshold_kb=args.full_scan_kb,
                                                     max_indexing_threads=args.threads))
    print(json.dumps({**info, "seconds": round(time.perf_counter() - started, 3)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
