"""ONNX Runtime intra-op spinning on vs off (``VLMRAG_CLIP_ONNX_SPINNING``): query encode p50, alone and beside other work.

One process, two embedders from the same export (ViT-B-32, random weights, 2 threads), one with each
setting. Each round times text queries (batch 1) and a 640x480 photo, first alone, then while a
Python thread in the same process runs a numpy float16 scan of 100k x 512 every 5 ms (what an inline
store search, JSON and the event loop are to a serving process). Reported: encode p50, and the scan's
p50 (how much of the cores the encoder leaves to the rest of the process).

    python benchmarks/bench_onnx_spin.py [--rounds 2] [--queries 60]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retriever.embedder import ClipEmbedder, load_embedder


def bench(embedder: ClipEmbedder, queries: list[str], photo: Image.Image, scan: bool) -> tuple[float, float, float]:
    stop = threading.Event()
    scans: list[float] = []
    matrix = np.random.default_rng(0).normal(size=(100_000, 512)).astype(np.float16)

    def scanner() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            int((matrix @ matrix[0]).argmax())
            scans.append((time.perf_counter() - started) * 1000)
            time.sleep(0.005)

    thread = threading.Thread(target=scanner) if scan else None
    if thread:
        thread.start()
    text, image = [], []
    for query in queries:
        started = time.perf_counter()
        embedder.embed_texts([query])
        text.append((time.perf_counter() - started) * 1000)
    for _ in range(max(5, len(queries) // 3)):
        started = time.perf_counter()
        embedder.embed_images([photo])
        image.append((time.perf_counter() - started) * 1000)
    stop.set()
    if thread:
        thread.join()
    return statistics.median(text), statistics.median(image), statistics.median(scans) if scans else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--queries", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    cache = Path(tempfile.mkdtemp(prefix="bench-onnx-spin-"))
    embedders = {spin: load_embedder("ViT-B-32", "none", device="cpu", threads=args.threads, backend="onnx",
                                     onnx_cache_dir=cache, onnx_spinning=spin) for spin in (True, False)}
    queries = [f"how do I clear error E-{i} on pump P-{i}-A" for i in range(args.queries)]
    photo = Image.new("RGB", (640, 480), (120, 30, 200))
    print(f"ViT-B-32 (random weights), onnx, {args.threads} threads; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    head = f"{'round':>5} | {'spinning':>8} | {'beside a scan':>13} | {'text p50 ms':>11} | {'image p50 ms':>12} | scan p50 ms"
    print(head + "\n" + "-" * len(head))
    for rnd in range(args.rounds):
        for spin in (True, False):
            for scan in (False, True):
                text, image, scanned = bench(embedders[spin], queries, photo, scan)
                print(f"{rnd:>5} | {'on' if spin else 'off':>8} | {'yes' if scan else 'no':>13} | {text:>11.1f} | "
                      f"{image:>12.1f} | {scanned:.1f}")


if __name__ == "__main__":
    main()
