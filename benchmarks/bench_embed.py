"""Query embedding latency, torch vs ONNX Runtime, batch 1, and the query-embedding cache, in one run.

Memory: each backend loads in its own child process (so resident memory is that backend's alone):
``torch``; ``onnx`` with an empty export cache (export, parity check and first load timed); ``onnx``
again from that cache (the steady state). Each prints load seconds, RSS after load and peak RSS.

Latency: one more child loads both (ONNX from that cache) and times them **alternately**, call by
call, on the same inputs, so load from other processes hits both alike: text and image query
p50/p95 at batch 1 (image = a 640x480 photo-like picture, CLIP preprocessing included, as a query
pays it), the image rate at batch 16 (ingestion), and the repeated-question p50 through
``embed_query_text`` without and with the ``EmbedCache``. Goals (issue 14): ONNX >= 1.6x faster
for images and >= 1.3x for text.

    python benchmarks/bench_embed.py [--model ViT-B-32 --pretrained none] [--threads 2] [--queries 40]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_mib() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MiB, from /proc (Linux)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields.get("VmRSS", float("nan")), fields.get("VmHWM", float("nan"))


def _p50_p95(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def _timed(fn, reps: int) -> list[float]:  # type: ignore[no-untyped-def]
    times = []
    for i in range(reps):
        started = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - started) * 1000)
    return times


def photo(seed: int, size: tuple[int, int] = (640, 480)):  # type: ignore[no-untyped-def]
    """A smooth photo-like RGB picture (gradients plus noise), deterministic per seed."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size[1], 0:size[0]].astype(np.float32)
    base = np.stack([np.sin(xx / (40 + 10 * c) + rng.random() * 6) * np.cos(yy / 55) for c in range(3)], -1)
    pixels = (base * 90 + 128 + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def memory_child(args: argparse.Namespace) -> None:
    """Load one backend and print its load time and RSS as one JSON line."""
    from retriever.embedder import load_embedder

    started = time.perf_counter()
    embedder = load_embedder(args.model, args.pretrained, device="cpu", threads=args.threads, batch_size=16,
                             backend=args.child, onnx_cache_dir=Path(args.cache_dir))
    load_s = time.perf_counter() - started
    embedder.embed_texts(["warm"])
    rss, peak = _rss_mib()
    print(json.dumps({"backend": embedder.backend, "load_s": load_s, "rss_mib": rss, "peak_rss_mib": peak}))


def latency_child(args: argparse.Namespace) -> None:
    """Load both backends, time them alternately, print {backend: results} as one JSON line."""
    import torch

    from retriever.embed_cache import EmbedCache
    from retriever.embedder import load_embedder

    both = {name: load_embedder(args.model, args.pretrained, device="cpu", threads=args.threads, batch_size=16,
                                backend=name, onnx_cache_dir=Path(args.cache_dir)) for name in ("torch", "onnx")}
    texts = [f"what does the warning light number {i} on the control panel of pump P-{i:03d} mean?"
             for i in range(args.queries + 3)]
    images = [photo(i) for i in range(max(8, args.queries // 2) + 2)]
    batch = torch.stack([both["torch"].preprocess(images[i % 8]) for i in range(16)])
    question = "how do I reset the pressure alarm?"
    for embedder in both.values():
        for i in range(3):  # warm-up: thread pools, allocator, first-call graph work
            embedder.embed_texts([texts[-1 - i]])
            embedder.embed_images([images[-1 - (i % 2)]])
        embedder.embed_preprocessed(batch)
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in both}

    def alternate(key: str, reps: int, call) -> None:  # type: ignore[no-untyped-def]
        for i in range(reps):
            for name, embedder in both.items():
                started = time.perf_counter()
                call(embedder, i)
                samples[name].setdefault(key, []).append((time.perf_counter() - started) * 1000)

    n_images = max(8, args.queries // 2)
    alternate("text", args.queries, lambda e, i: e.embed_texts([texts[i]]))
    alternate("image", n_images, lambda e, i: e.embed_images([images[i % (len(images) - 2)]]))
    alternate("batch", 3, lambda e, i: e.embed_preprocessed(batch))
    alternate("no_cache", max(5, args.queries // 4), lambda e, i: e.embed_query_text(question))
    for embedder in both.values():
        embedder.cache = EmbedCache()
    alternate("cache", args.queries, lambda e, i: e.embed_query_text(question))  # 1 miss, then hits
    onnx = both["onnx"].onnx
    print(json.dumps({name: {
        "text": _p50_p95(s["text"]), "image": _p50_p95(s["image"]),
        "batch16_img_s": 16000 / statistics.median(s["batch"]), "repeat_no_cache": statistics.median(s["no_cache"]),
        "repeat_cache": statistics.median(s["cache"]), "onnx_max_diff": onnx.max_diff if onnx else None,
    } for name, s in samples.items()}))


def run_child(backend: str, args: argparse.Namespace, cache_dir: str) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", backend, "--cache-dir", cache_dir, "--model", args.model,
               "--pretrained", args.pretrained, "--threads", str(args.threads), "--queries", str(args.queries)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        raise SystemExit(f"{backend} child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default="none", help="'none' = random weights (same architecture)")
    parser.add_argument("--threads", type=int, default=2, help="torch / ONNX Runtime intra-op threads")
    parser.add_argument("--queries", type=int, default=40, help="text queries timed (images: half as many)")
    parser.add_argument("--child", choices=("torch", "onnx", "latency"), help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        latency_child(args) if args.child == "latency" else memory_child(args)
        return
    load = os.getloadavg()[0]
    print(f"query embedding, {args.model} pretrained={args.pretrained}, batch 1, {args.threads} threads; "
          f"{os.cpu_count()} CPUs, load average {load:.1f} at start")
    with tempfile.TemporaryDirectory() as cache_dir:
        memory = [("torch", run_child("torch", args, cache_dir)),
                  ("onnx (export)", run_child("onnx", args, cache_dir)),
                  ("onnx (cached)", run_child("onnx", args, cache_dir))]
        latency = run_child("latency", args, cache_dir)
    print(f"{'backend':<14} | {'load s':>6} | {'RSS MiB':>7} | {'peak MiB':>8}")
    for name, r in memory:
        print(f"{name:<14} | {r['load_s']:>6.1f} | {r['rss_mib']:>7.0f} | {r['peak_rss_mib']:>8.0f}")
    header = (f"{'backend':<7} | {'text p50/p95 ms':>15} | {'image p50/p95 ms':>16} | {'batch16 img/s':>13} | "
              f"{'repeated question p50 ms: no cache / cache':>42}")
    print(header)
    print("-" * len(header))
    for name, r in latency.items():
        text, image = r["text"], r["image"]
        print(f"{name:<7} | {text[0]:>6.1f} / {text[1]:<6.1f} | {image[0]:>7.1f} / {image[1]:<6.1f} | "
              f"{r['batch16_img_s']:>13.1f} | {r['repeat_no_cache']:>20.2f} / {r['repeat_cache']:<19.4f}")
    torch_r, onnx_r = latency["torch"], latency["onnx"]
    print(f"speed-up torch/onnx p50: text {torch_r['text'][0] / onnx_r['text'][0]:.2f}x (goal 1.3x), "
          f"image {torch_r['image'][0] / onnx_r['image'][0]:.2f}x (goal 1.6x), "
          f"batch 16 {onnx_r['batch16_img_s'] / torch_r['batch16_img_s']:.2f}x; "
          f"onnx max abs diff vs torch {onnx_r['onnx_max_diff']:.1e}")


if __name__ == "__main__":
    main()
