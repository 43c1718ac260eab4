"""Ingestion throughput vs the raw CLIP encoder on the same images, and start-up to the first batch.

    python benchmarks/bench_ingest.py                                  # tiny random CLIP (seconds)
    python benchmarks/bench_ingest.py --model ViT-B-32 --pretrained none --threads 2 --batch-size 8

Raw encoder = preprocess + encode only, from already decoded PIL images, batch by batch in one
thread (the upper bound). Pipeline = ``IngestPipeline.run`` end to end from JPEG files on disk:
read, decode, thumbnail, preprocess, encode, blobs (fsync'd) and upsert into an embedded Qdrant
Edge store. Both rates are steady state (the first batch excluded). The raw rate is measured
before and after the pipeline and averaged, so drift on a shared machine hits both sides.
Start-up = load the model + open the store + first chunk embedded (goal ≤ 5 s).
``--ocr on`` gives the pipeline an ``OcrEngine`` as the service does (OCR on by default there; the
photos have no text: issue 21's goal is >= 0.8 of the raw encoder with OCR on).
``--backend onnx`` uses the ONNX Runtime CLIP (the service's usual backend), exported once under the temp dir.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retriever.blobs import LocalBlobStore
from retriever.embedder import ClipEmbedder, load_embedder
from retriever.ingest import IngestPipeline, IngestReport, read_folder
from retriever.store import open_store
from tests.support.tiny_clip import write_tiny_clip_config


def make_photos(folder: Path, count: int, min_side: int, max_side: int, seed: int = 0) -> None:
    """Photo-like JPEGs: smooth random colour fields plus grain, sizes between min and max side."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        w, h = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
        base = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        grain = rng.normal(0, 12, (h, w, 3))
        pixels = np.clip(np.asarray(base, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"photo{i:04d}.jpg", quality=88)


def raw_rate(embedder: ClipEmbedder, images: list[Image.Image], batch_size: int) -> float:
    """Steady-state images/s of preprocess + encode (first batch excluded)."""
    marks = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        embedder.embed_preprocessed(torch.stack([embedder.preprocess(im) for im in chunk]))
        marks.append((time.perf_counter(), start + len(chunk)))
    (t0, n0), (t1, n1) = marks[0], marks[-1]
    return (n1 - n0) / (t1 - t0)


async def pipeline_run(
    args: argparse.Namespace, model: str, photos: Path, work: Path, embedder: ClipEmbedder | None,
) -> tuple[float, float, IngestReport, ClipEmbedder]:
    """(steady images/s, start-up s, report, embedder); start-up includes the model load when not given."""
    started = time.perf_counter()
    store = await open_store(qdrant_url="", api_key="", path=work / "qdrant", collection="bench")
    if embedder is None:
        t0 = time.perf_counter()
        embedder = load_embedder(model, args.pretrained, args.device, args.threads, args.batch_size,
                                 backend=args.backend, onnx_cache_dir=work.parent / "onnx")
        args.model_load_s = time.perf_counter() - t0
    await store.ensure_collection(embedder.dim, embedder.identity)
    blobs = LocalBlobStore(work / "blobs")
    reader = None
    if args.engine is not None:
        engine = args.engine
        reader = lambda image, page=False: engine.read(image, timeout_s=30, page=page)  # noqa: E731
    pipeline = IngestPipeline(embedder, store, blobs, batch_size=args.batch_size, ocr=reader)
    marks: list[tuple[float, int]] = []
    run_started = time.perf_counter()
    report = await pipeline.run(read_folder(photos), progress=lambda r: marks.append((time.perf_counter(), r.ingested)))
    await store.close()
    startup = run_started - started + (report.first_batch_s or 0.0)
    (t0, n0), (t1, n1) = marks[0], marks[-1]
    return (n1 - n0) / (t1 - t0), startup, report, embedder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--min-side", type=int, default=256)
    parser.add_argument("--max-side", type=int, default=640)
    parser.add_argument("--model", default=None, help="open_clip name or config JSON (default: tiny CLIP)")
    parser.add_argument("--pretrained", default="none")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", choices=["torch", "onnx"], default="torch")
    parser.add_argument("--ocr", choices=["on", "off"], default="off",
                        help="OCR in the pipeline (the service's default: on)")
    args = parser.parse_args()
    args.engine = None
    if args.ocr == "on":
        from retriever.ocr import OcrEngine

        args.engine = OcrEngine()
        args.engine.warm()

    tmp = Path(tempfile.mkdtemp(prefix="vlmrag-bench-ingest-"))
    try:
        model = args.model or str(write_tiny_clip_config(tmp / "model"))
        photos = tmp / "photos"
        make_photos(photos, args.images, args.min_side, args.max_side)
        # Start-up is measured first, in a cold-ish state: model load + store + first batch.
        _, startup, _, embedder = asyncio.run(pipeline_run(args, model, photos, tmp / "cold", None))
        decoded = [Image.open(p).convert("RGB") for p in sorted(photos.glob("*.jpg"))]
        raw_before = raw_rate(embedder, decoded, args.batch_size)
        rate, _, report, _ = asyncio.run(pipeline_run(args, model, photos, tmp / "warm", embedder))
        raw_after = raw_rate(embedder, decoded, args.batch_size)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    raw = (raw_before + raw_after) / 2
    rows = [
        ("embedder", embedder.identity),
        ("images / batch size / torch threads", f"{args.images} / {args.batch_size} / {torch.get_num_threads()}"),
        ("raw encoder images/s (before, after)", f"{raw:.1f} ({raw_before:.1f}, {raw_after:.1f})"),
        ("pipeline images/s (steady state)", f"{rate:.1f}"),
        ("ratio pipeline / raw (goal >= 0.95)", f"{rate / raw:.2f}"),
        ("encoder busy share of the pipeline run", f"{report.timings['encode'] / report.timings['total']:.3f}"),
        ("start-up to first embedded batch, s (goal <= 5)", f"{startup:.2f}"),
        ("  of which: model load (imports included), s", f"{args.model_load_s:.2f}"),
        ("pipeline ingested / failed", f"{report.ingested} / {report.failed}"),
        ("OCR / backend / load average", f"{args.ocr} / {embedder.backend} / {os.getloadavg()[0]:.2f}"),
        ("stage seconds (summed over threads)",
         ", ".join(f"{k} {v:.2f}" for k, v in report.timings.items())),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"{'metric'.ljust(width)} | value")
    print(f"{'-' * width}-|-{'-' * 40}")
    for key, value in rows:
        print(f"{key.ljust(width)} | {value}")


if __name__ == "__main__":
    main()
