"""Backup and restore seconds beside ``tar`` of the stopped data dir, and ``/v1/search`` p95 during a backup.

``python benchmarks/bench_backup.py [--points 100000] [--blob-every 4] [--searches 200]`` fills a data
dir's embedded store with N points shaped like ingested snippets (512-d ``image`` and ``text``, a BM25
vector, a ~300-character payload) and a blob (16 KB) plus thumbnail (2 KB) for every ``blob-every``-th
point, then, in the same run:

* ``tar -cf`` of the stopped data dir (the baseline of a backup) and ``tar -xf`` of it into an empty
  folder (of a restore), each also with the ``sync`` after it (vlmrag makes what it writes durable, tar
  does not); every step starts after a ``sync``, so none pays for the write-back of the one before;
* ``BackupService.backup`` of the same data (what ``vlmrag backup`` runs: the embedded store is archived
  as its shard's files, ``"method": "edge-shard"``; ``--format logical`` measures the portable point
  export instead) and ``restore`` of its archive into an empty data dir (``vlmrag restore``: checksums
  verified first, the CLIP model loaded to check the embedder, a new version, switch);
* ``/v1/search`` p50/p95 (ASGI, the real app and store, text queries, exact scan) idle, then while a
  backup through ``POST /v1/admin/backup`` runs in the same process.

The CLIP model is the tiny random one with 512 dimensions (search cost is the store's, not the model's).
Goals (issue 22): backup <= 1.5x tar, restore <= 2x tar, search p95 during a backup <= 1.5x idle.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retriever.blobs import LocalBlobStore
from retriever.store.edge import EdgeStore
from retriever.types import PointRecord, SnippetPayload

DIM = 512
TINY_512 = {
    "embed_dim": DIM,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
WORDS = ["pump", "impeller", "seal", "valve", "error", "code", "wiring", "diagram", "bearing", "motor", "housing", "gasket", "flange", "torque", "pressure", "sensor", "relay", "fuse"]


def settings_for(data_dir: Path, clip: Path, **extra: object):  # type: ignore[no-untyped-def]
    from server.settings import Settings

    return Settings(_env_file=None, data_dir=data_dir, clip_model=str(clip), clip_pretrained="none",  # type: ignore[call-arg]
                    clip_device="cpu", clip_backend="torch", auth_disabled=True, ocr_enabled=False,
                    ocr_query_enabled=False, rate_limit_rps=1e6, rate_limit_burst=10**6, rate_limit_kb_rps=1e6,
                    rate_limit_kb_burst=10**6, hnsw_auto=False, **extra)


async def fill(settings, points: int, blob_every: int, identity: str) -> None:  # type: ignore[no-untyped-def]
    from retriever.lexical import document_vector

    store = EdgeStore(settings.embedded_store_path, settings.collection)
    await store.open()
    await store.ensure_collection(DIM, identity)
    blobs = LocalBlobStore(settings.blob_dir, fsync=False)
    rng = np.random.default_rng(7)
    batch: list[PointRecord] = []
    for i in range(points):
        words = " ".join(rng.choice(WORDS, 40))
        image_ref = thumb_ref = None
        if blob_every and i % blob_every == 0:
            image_ref = blobs.put(rng.bytes(16 << 10), ".png")
            thumb_ref = blobs.put(rng.bytes(2 << 10), ".jpg")
        payload = SnippetPayload(kind="image_text" if image_ref else "text", text=words, source=f"manuals/m{i % 50}.pdf",
                                 tags=["bench"], content_hash=f"{i:064x}", image_ref=image_ref, thumb_ref=thumb_ref,
                                 created_at="2026-01-01T00:00:00+00:00")
        vectors = rng.standard_normal((2, DIM)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        sparse = document_vector(words)
        batch.append(PointRecord(str(uuid.uuid5(uuid.NAMESPACE_URL, str(i))),
                                 {"image": vectors[0].tolist(), "text": vectors[1].tolist()}, payload,
                                 sparse if len(sparse) else None))
        if len(batch) == 1000:
            await store.upsert(batch)
            batch = []
    await store.upsert(batch)
    await store.close()


def timed(argv: list[str]) -> tuple[float, float]:
    """(seconds of ``argv``, seconds of the ``sync`` after it): vlmrag fsyncs what it writes, tar does not."""
    os.sync()  # nothing dirty left by the step before
    started = time.perf_counter()
    subprocess.run(argv, check=True)
    done = time.perf_counter()
    os.sync()
    return done - started, time.perf_counter() - done


def timed_call(fn) -> float:  # type: ignore[no-untyped-def]
    os.sync()
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


async def backup_once(settings, out: Path, fmt: str = "auto") -> float:  # type: ignore[no-untyped-def]
    from server.commands.kb import _opener
    from server.knowledge_bases import KBCatalog, KnowledgeBases, database_url
    from server.services.backups import BackupService

    kbs = KnowledgeBases(settings, KBCatalog(database_url(settings)), _opener(settings, False))
    try:
        started = time.perf_counter()
        await BackupService(settings, kbs, nice=0).backup(out, fmt=fmt)  # as `vlmrag backup` runs it
        return time.perf_counter() - started
    finally:
        await kbs.close()


async def search_latencies(client, n: int) -> list[float]:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(3)
    times = []
    for _ in range(n):
        query = " ".join(rng.choice(WORDS, 4))
        started = time.perf_counter()
        response = await client.post("/v1/search", json={"text": query, "k": 10, "mode": "dense", "scorer": "none"})
        times.append(time.perf_counter() - started)
        response.raise_for_status()
    return times


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000


async def search_during_backup(settings, searches: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    import httpx

    from server.app import create_app

    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=600) as client:
            await search_latencies(client, 10)  # warm
            idle = await search_latencies(client, searches)
            backup = asyncio.create_task(client.post("/v1/admin/backup", json={}))
            during: list[float] = []
            while not backup.done():
                during.extend(await search_latencies(client, 5))
            response = await backup
            response.raise_for_status()
    return {"idle_p50": pct(idle, 50), "idle_p95": pct(idle, 95), "during_p50": pct(during, 50) if during else 0,
            "during_p95": pct(during, 95) if during else 0, "during_n": len(during)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--blob-every", type=int, default=4, help="A blob and thumbnail every N points (0: none).")
    parser.add_argument("--searches", type=int, default=200)
    parser.add_argument("--format", default="auto", choices=["auto", "logical"], help="vlmrag backup --format.")
    parser.add_argument("--keep", action="store_true", help="Keep the temporary folder.")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="vlmrag-bench-backup-"))
    try:
        clip = root / "bench-tiny-512.json"
        clip.write_text(json.dumps(TINY_512))
        data = root / "data"
        settings = settings_for(data, clip, backup_dir=str(root / "api-backups"))
        from server.services.backups import configured_embedder, restore

        identity, _ = configured_embedder(settings)
        started = time.perf_counter()
        asyncio.run(fill(settings, args.points, args.blob_every, identity))
        print(f"filled {args.points} points ({args.points // args.blob_every if args.blob_every else 0} blobs) "
              f"in {time.perf_counter() - started:.1f} s; cpus {os.cpu_count()}, load {os.getloadavg()[0]:.2f}")
        size = sum(p.stat().st_size for p in data.rglob("*") if p.is_file())
        tar_out = root / "data.tar"
        tar_s, tar_sync_s = timed(["tar", "-cf", str(tar_out), "-C", str(data), "."])
        untar_dir = root / "untar"
        untar_dir.mkdir()
        untar_s, untar_sync_s = timed(["tar", "-xf", str(tar_out), "-C", str(untar_dir)])
        archive = root / "bench.vlmrag.tar"
        backup_s = timed_call(lambda: asyncio.run(backup_once(settings, archive, args.format)))
        from retriever.backup import read_manifest

        method = read_manifest(archive)["kbs"]["default"]["method"]
        restored = settings_for(root / "restored", clip)
        restore_s = timed_call(lambda: asyncio.run(restore(restored, archive)))
        print(f"data dir {size / 1e6:.0f} MB, tar {tar_out.stat().st_size / 1e6:.0f} MB, "
              f"archive {archive.stat().st_size / 1e6:.0f} MB ({method}); load {os.getloadavg()[0]:.2f}")
        print(f"{'':<10}{'seconds':>10}{'tar s':>10}{'ratio':>8}{'goal':>8}{'tar+sync s':>12}{'ratio':>8}")
        for label, ours, base, synced, goal in (("backup", backup_s, tar_s, tar_sync_s, 1.5),
                                                ("restore", restore_s, untar_s, untar_sync_s, 2.0)):
            print(f"{label:<10}{ours:>10.2f}{base:>10.2f}{ours / base:>8.2f}{goal:>8.1f}{base + synced:>12.2f}"
                  f"{ours / (base + synced):>8.2f}")
        shutil.rmtree(untar_dir)
        tar_out.unlink()
        shutil.rmtree(root / "restored")
        search = asyncio.run(search_during_backup(settings, args.searches))
        ratio = search["during_p95"] / search["idle_p95"] if search["idle_p95"] else 0
        print(f"/v1/search ms: idle p50 {search['idle_p50']:.1f} p95 {search['idle_p95']:.1f}; during a backup "
              f"p50 {search['during_p50']:.1f} p95 {search['during_p95']:.1f} ({int(search['during_n'])} searches); "
              f"p95 ratio {ratio:.2f} (goal 1.5)")
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
