"""/v1/search p50 end to end at 10k and 100k points against the CLIP text-encode floor of the same run.

For each size N a fresh data dir is filled through ``EdgeStore`` (the store the service opens:
``settings.embedded_store_path`` / ``collection``, created with the embedder's real identity) with N
synthetic snippets: clustered unit vectors for both dense vectors (``image`` and ``text``, the recipe
of bench_hnsw.clustered_with_queries), a support-manual payload (kind ``text``, a short text with
identifiers such as "pump P-100-A error E-417", a source) and its BM25 ``lexical`` vector
(``retriever.lexical.snippet_lexical``, what the ingest pipeline stores). Then the real app runs
under uvicorn on loopback (``make_settings``: auth off, no OCR, limits out of the way; scorer
``clip`` needs no vLLM) and 100 distinct support questions are sent one at a time (5 warm-up).

* encode floor: ``embed_query_text`` of the same questions on an embedder built like the server's
  (``server.wiring.build_embedder``, same backend), in this process, server idle, right before each row;
* ``POST /v1/search {"text": q, "scorer": "clip", "mode": hybrid|dense}``, client-side, plus the
  server's own stage timings (``embed``, ``search`` = store queries + fusion, ``total``);
* the same after ``vlmrag optimize`` (``optimize_store(settings, force=True)``, server stopped and
  restarted) for sizes >= ``hnsw_min_points`` (``--hnsw all`` / ``none`` to change that).

The query-embedding cache is disabled (``embed_cache_entries=0``), so every request pays its encode.
CLIP is open_clip ViT-B-32 with random weights (``pretrained=none``: real 512-d architecture, so a real
encode cost) or, with ``--tiny``, the tiny config of tests/support/tiny_clip.py. Goal (issue 14):
search p50 <= encode p50 + 5 ms. ``--ort-spin on`` lets ONNX Runtime's threads spin-wait between ops
(``VLMRAG_CLIP_ONNX_SPINNING``; off by default since this benchmark showed what spinning costs the
query path on a small, busy box).

    .venv/bin/python benchmarks/bench_search_scale.py [--sizes 10000,100000] [--backend onnx|torch]
        [--tiny] [--queries 100] [--hnsw auto|all|none] [--ort-spin off|on]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_hnsw import clustered_with_queries
from benchmarks.bench_service import pct
from retriever.embedder import ClipEmbedder
from retriever.lexical import snippet_lexical
from retriever.store.edge import EdgeStore
from retriever.types import PointRecord, SnippetPayload
from server.app import create_app
from server.commands.optimize import optimize_store
from server.settings import Settings
from server.wiring import build_embedder
from tests.support.fixtures_server import UvicornThread, make_settings
from tests.support.tiny_clip import write_tiny_clip_config
from tests.support.vllm_server import free_port

DEVICES = ["pump", "valve", "compressor", "chiller", "boiler", "router", "printer", "inverter", "scanner",
           "dryer"]
SYMPTOMS = ["shows error", "stops with fault", "blinks code", "reports alarm", "logs warning"]
ACTIONS = ["check the inlet filter and restart", "replace the fuse F2", "reset the controller to factory",
           "tighten the coupling and recalibrate", "update the firmware to v2.3.1", "call service"]
QUESTIONS = ["What does {code} mean on the {dev} {model}?", "My {dev} {model} {symptom} {code}, what now?",
             "How do I clear {code} on a {model} {dev}?", "Why does the {dev} {model} keep showing {code}?"]


#: what both search benchmarks serve with: query cache off (every request encodes), pool 20, k 5, limits away
SERVER_SETTINGS = {"embed_cache_entries": 0, "retrieval_pool": 20, "retrieval_k": 5, "rate_limit_rps": 1e6,
                   "rate_limit_burst": 1_000_000}


def ident(rng: np.random.Generator) -> tuple[str, str, str]:
    dev = DEVICES[rng.integers(len(DEVICES))]
    model = f"{dev[0].upper()}-{rng.integers(100, 999)}-{'ABCD'[rng.integers(4)]}"
    return dev, model, f"E-{rng.integers(100, 999)}"


def snippet_text(rng: np.random.Generator) -> str:
    dev, model, code = ident(rng)
    return (f"{dev} {model} {SYMPTOMS[rng.integers(len(SYMPTOMS))]} {code}: "
            f"{ACTIONS[rng.integers(len(ACTIONS))]}. Applies to {model} units built after 2019.")


def questions(count: int, rng: np.random.Generator) -> list[str]:
    """``count`` distinct support questions (a repeated text would hit no cache anyway: it is off)."""
    out: dict[str, None] = {}
    while len(out) < count:
        dev, model, code = ident(rng)
        template = QUESTIONS[rng.integers(len(QUESTIONS))]
        symptom = SYMPTOMS[rng.integers(len(SYMPTOMS))]
        out[template.format(dev=dev, model=model, code=code, symptom=symptom)] = None
    return list(out)


async def fill(settings: Settings, embedder: ClipEmbedder, n: int, rng: np.random.Generator,
               batch: int = 2000) -> float:
    """N synthetic snippets into the settings' embedded store; returns seconds."""
    started = time.perf_counter()
    store = EdgeStore(Path(settings.embedded_store_path), settings.collection)
    await store.open()
    await store.ensure_collection(embedder.dim, embedder.identity)
    for start in range(0, n, batch):
        stop = min(start + batch, n)
        image, text = (clustered_with_queries(stop - start, 0, rng, dim=embedder.dim)[0] for _ in range(2))
        points = []
        for i, k in enumerate(range(start, stop)):
            payload = SnippetPayload(kind="text", text=snippet_text(rng), source=f"manuals/{k % 500:03d}.pdf",
                                     tags=["bench"], content_hash=f"{k:064x}", page=k % 40,
                                     created_at="2024-01-01T00:00:00+00:00")
            points.append(PointRecord(str(uuid.UUID(int=k + 1)), {"image": image[i].tolist(),
                                      "text": text[i].tolist()}, payload, snippet_lexical(payload)))
        await store.upsert(points)
    await store.close()
    return time.perf_counter() - started


def encode_floor(embedder: ClipEmbedder, queries: list[str]) -> list[float]:
    times = []
    for q in [*queries[:5], *queries]:  # 5 warm-up
        t = time.perf_counter()
        embedder.embed_query_text(q)
        times.append((time.perf_counter() - t) * 1000)
    return times[5:]


def measure(url: str, queries: list[str], mode: str) -> tuple[list[float], dict[str, list[float]], int]:
    """Client ms per request, the server's timings per stage, and how many responses had BM25 hits."""
    times: list[float] = []
    stages: dict[str, list[float]] = {}
    lexical_hits = 0
    with httpx.Client(base_url=url, timeout=60) as http:
        for i, q in enumerate([*queries[:5], *queries]):
            t = time.perf_counter()
            r = http.post("/v1/search", json={"text": q, "scorer": "clip", "mode": mode})
            elapsed = (time.perf_counter() - t) * 1000
            r.raise_for_status()
            if i < 5:
                continue
            body, times = r.json(), [*times, elapsed]
            tm = body["timings"]
            own = sum(v for k, v in tm.items() if k != "total")  # decode, embed, search, rerank
            tm.update(http=elapsed - tm["total"], other=tm["total"] - own, rest=elapsed - tm.get("embed", 0))
            for name, ms in tm.items():
                stages.setdefault(name, []).append(ms)
            lexical_hits += any("text->lexical" in c["vector_scores"] for c in body["candidates"])
    return times, stages, lexical_hits


def serve_and_measure(settings: Settings, queries: list[str], embedder: ClipEmbedder,
                      size: int, index: str) -> list[tuple]:
    server = UvicornThread(create_app(settings), free_port())
    server.start()
    url = f"http://127.0.0.1:{server.server.config.port}"
    rows = []
    try:
        for mode in ("hybrid", "dense"):
            floor = encode_floor(embedder, queries)  # right before the row: server idle, same backend
            times, stages, lexical_hits = measure(url, queries, mode)
            rows.append((size, mode, index, times, floor, stages, lexical_hits, os.getloadavg()[0]))
    finally:
        server.stop()
    return rows


def print_table(rows: list[tuple], n_queries: int) -> None:
    cols = [("points", 7), ("mode", 6), ("index", 5), ("search p50", 10), ("p95", 6), ("encode p50", 10),
            ("p95", 5), ("search-enc", 10), ("goal", 4), ("srv embed", 9), ("srv search", 10),
            ("srv other", 9), ("srv total", 9), ("http+json", 9), ("e2e-embed", 9), ("bm25 hit", 8),
            ("load", 4)]
    head = " | ".join(f"{name:>{width}}" for name, width in cols)
    print("\n" + head + "\n" + "-" * len(head))
    for size, mode, index, times, floor, stages, lex, load in rows:
        s50, e50 = statistics.median(times), statistics.median(floor)
        med = {k: statistics.median(v) for k, v in stages.items()}
        cells = [size, mode, index, f"{s50:.2f}", f"{pct(times, 95):.2f}", f"{e50:.2f}",
                 f"{pct(floor, 95):.1f}", f"{s50 - e50:+.2f}", "yes" if s50 - e50 <= 5 else "NO",
                 *(f"{med.get(k, 0):.2f}" for k in ("embed", "search", "other", "total", "http", "rest")),
                 f"{lex}/{n_queries}", f"{load:.1f}"]
        print(" | ".join(f"{cell:>{width}}" for cell, (_, width) in zip(cells, cols, strict=True)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000", type=lambda s: [int(x) for x in s.split(",") if x])
    parser.add_argument("--backend", choices=["onnx", "torch"], default="onnx")
    parser.add_argument("--tiny", action="store_true", help="the tiny test CLIP instead of ViT-B-32")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--hnsw", choices=["auto", "all", "none"], default="auto",
                        help="auto: optimize sizes >= hnsw_min_points (50000); all / none")
    parser.add_argument("--ort-spin", choices=["on", "off"], default="off",
                        help="ONNX Runtime intra-op thread spinning (VLMRAG_CLIP_ONNX_SPINNING; off: the default)")
    args = parser.parse_args()
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench-search-scale-"))
    onnx_dir = tmp / "onnx"  # one export shared by every data dir (data_dir/onnx is a link to it)
    onnx_dir.mkdir()
    model = str(write_tiny_clip_config(tmp)) if args.tiny else "ViT-B-32"
    rng = np.random.default_rng(0)
    queries = questions(args.queries, rng)
    load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"/v1/search vs CLIP text encode: {model} (random weights), backend {args.backend}, {args.queries} "
          f"distinct queries (+5 warm-up), embed cache off, pool 20, scorer clip, ORT spinning "
          f"{args.ort_spin}; {os.cpu_count()} CPUs, load average {load} at start")

    def settings_for(size: int) -> Settings:
        (data := tmp / f"data-{size}").mkdir()
        (data / "onnx").symlink_to(onnx_dir)
        return make_settings(data, Path(model), clip_model=model, clip_backend=args.backend,
                             clip_onnx_spinning=args.ort_spin == "on", **SERVER_SETTINGS)

    embedder = build_embedder(settings_for(0))  # the floor's embedder; also makes the shared ONNX export
    print(f"{embedder.identity} ({embedder.backend}) loaded in {time.perf_counter() - started:.1f} s")
    rows: list[tuple] = []
    try:
        for size in args.sizes:
            settings = settings_for(size)
            seconds = asyncio.run(fill(settings, embedder, size, rng))
            print(f"{size} points filled in {seconds:.1f} s ({size / seconds:,.0f}/s)", flush=True)
            rows += serve_and_measure(settings, queries, embedder, size, "exact")
            if args.hnsw == "all" or (args.hnsw == "auto" and size >= settings.hnsw_min_points):
                result = asyncio.run(optimize_store(settings, force=True))
                print(f"{size} points: HNSW (m={result['m']}, ef_construct={result['ef_construct']}, "
                      f"hnsw_ef={settings.hnsw_ef or 'by size'}) built in {result['seconds']:.1f} s, "
                      f"{result['segments']} segments", flush=True)
                rows += serve_and_measure(settings, queries, embedder, size, "hnsw")
    finally:
        print_table(rows, args.queries)
        shutil.rmtree(tmp, ignore_errors=True)
    print("\nms; srv columns: p50 of the response's timings (search = store queries + RRF fusion; other = "
          "total - its stages: KB lookup, plan, candidates); http+json: p50 of client - server total per "
          "request (ASGI, validation, JSON, loopback); e2e-embed: p50 of client - server embed per request "
          "(all but the encode, paired: steadier than search-enc on a busy box). Wall time "
          f"{time.perf_counter() - started:.0f} s, load average {os.getloadavg()[0]:.2f} at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
