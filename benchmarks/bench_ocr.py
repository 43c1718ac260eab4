"""Query-time OCR per photo, before (rapidocr's default path) and after (retriever/ocr_stages.py), and image /v1/search.

    .venv/bin/python benchmarks/bench_ocr.py            # 12 devices: 72 display photos, ViT-B-32 ONNX search
    .venv/bin/python benchmarks/bench_ocr.py --quick    # 4 devices, tiny CLIP search (a smoke run for `make bench`)

Per-photo OCR, the two paths called alternately photo by photo in one process (drift on a shared
box hits both alike), each warmed up first:

* **before**: ``RapidOCR(params)`` as ``OcrEngine`` configured it before issue 21 (detection at a
  960 px long side, the direction classifier on every box, rapidocr's ORT options: one thread per
  core, spin-waiting) called on the PIL image;
* **after**: ``OcrEngine.read`` (coarse detection with early exit, recognition of detected boxes
  only, fine detection only where needed, classifier only for weak lines; no spinning).

Photo sets: the display photos of ``benchmarks/support_kb.py`` (its query photos, a device panel
with an error code, read verbatim or not), the KB photos of the same generator (displays and part
labels, as ingestion reads them), photos without text (smooth colour fields with grain, 1024x768
and 640x480, as bench_ingest makes), scanned-page photos (an A4 page at 150 dpi, 26 px text; words
read), small two-line part labels (a third of the photo, tilted; both lines read) and one
repeated photo (the same display photo again: ``read(cached=True)``, a cache hit).

Image /v1/search: two apps under uvicorn (OCR on: ``ocr_query_enabled``; OCR off), query-embedding
cache off, distinct display / no-text photos half and half with "what does this mean?", requests
alternating between the two servers; client-side p50 and the ratio on / off.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from support_kb import build_support_kb, load_font

from retriever.ocr import OcrEngine
from retriever.ocr_cache import OcrCache
from retriever.ocr_stages import DET_MODEL, REC_MODEL, models_dir

WORDS = "pump valve error reset firmware sensor pressure filter module heater display power cable relay".split()


def reads(text: str, identifier: str) -> bool:
    return identifier.lower() in text.lower()


def no_text_photo(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    grain = rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(base, dtype=np.float32) + grain, 0, 255).astype(np.uint8))


def page_photo(seed: int, width: int = 1240, height: int = 1754, text_px: int = 26) -> tuple[Image.Image, list[str]]:
    rng = random.Random(seed)
    image = Image.new("RGB", (width, height), (250, 250, 245))
    draw, font = ImageDraw.Draw(image), load_font("DejaVuSans.ttf", text_px)
    words: list[str] = []
    y = 120
    while y < height - 150:
        line = " ".join(rng.choice(WORDS) for _ in range(7)) + f" E-{rng.randint(100, 999)}"
        draw.text((100, y), line, font=font, fill=(20, 20, 20))
        words += line.split()
        y += int(text_px * 1.6)
    return image, words


def label_photo(big: int, small: int, ground: tuple[int, int, int], seed: int) -> tuple[Image.Image, list[str]]:
    """A two-line part label across a third of a 714 x 591 photo, tilted 8 degrees: small text whose
    lines merge into one block at a coarse detection size (both lines must be read)."""
    rng = np.random.default_rng(seed)
    photo = np.full((591, 714, 3), ground, np.float32) + rng.normal(0, 6, (591, 714, 3))
    image = Image.fromarray(photo.clip(0, 255).astype(np.uint8))
    part, name = f"P-{100 + seed * 13 % 900}-{'ABCDE'[seed % 5]}", ("door seal", "drain hose", "fan motor")[seed % 3]
    label = Image.new("RGB", (290, 120), (242, 242, 240))
    draw = ImageDraw.Draw(label)
    draw.text((22, 14), part, font=load_font("DejaVuSans.ttf", big), fill=(25, 25, 25))
    draw.text((22, 74), name, font=load_font("DejaVuSans.ttf", small), fill=(25, 25, 25))
    image.paste(label.rotate(-8, expand=True, resample=Image.Resampling.BICUBIC, fillcolor=ground), (210, 200))
    return image.filter(ImageFilter.GaussianBlur(0.8)), [part, name]


def all_read(text: str, lines: list[str]) -> float:
    return float(all(reads(text, line) for line in lines))


def words_read(text: str, words: list[str]) -> float:
    got = set(re.findall(r"[\w-]+", text.lower()))
    return sum(w.lower() in got for w in words) / len(words)


def before_reader() -> Callable[[Image.Image], str]:
    """rapidocr's default path as OcrEngine drove it before issue 21."""
    from rapidocr import RapidOCR

    folder = models_dir()
    engine = RapidOCR(params={
        "Global.log_level": "error", "Global.text_score": 0.5, "Global.max_side_len": 2000,
        "Det.model_path": str(folder / DET_MODEL), "Rec.model_path": str(folder / REC_MODEL),
        "Cls.model_path": str(folder / "ch_ppocr_mobile_v2.0_cls_mobile.onnx"),
        "Det.limit_type": "max", "Det.limit_side_len": 960,
        "EngineConfig.onnxruntime.intra_op_num_threads": -1,
    })

    def read(image: Image.Image) -> str:
        out = engine(image)
        return "\n".join(str(t).strip() for t in (getattr(out, "txts", None) or ()) if str(t).strip())
    return read


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ocr_rows(sets: dict[str, list[tuple[Image.Image, Any]]], repeated: Image.Image) -> list[tuple]:
    before = before_reader()
    after = OcrEngine(cache=OcrCache(64, 1 << 20), timeout_s=60)
    after.warm()
    warm = next(iter(sets.values()))[0][0]
    before(warm), after.read(warm)
    judges: dict[str, Callable[[str, Any], float]] = {
        "display": lambda t, c: float(reads(t, c)), "kb photos": lambda t, c: float(reads(t, c)),
        "no text": lambda t, _c: float(not t.strip()), "scanned page": words_read, "small labels": all_read,
    }
    rows = []
    for name, items in sets.items():
        times: dict[str, list[float]] = {"before": [], "after": []}
        quality: dict[str, list[float]] = {"before": [], "after": []}
        for n, (image, truth) in enumerate(items):
            order = ("before", "after") if n % 2 == 0 else ("after", "before")
            for path in order:
                t = time.perf_counter()
                text = before(image) if path == "before" else after.read(image).text
                times[path].append((time.perf_counter() - t) * 1000)
                quality[path].append(judges[name](text, truth))
        rows.append((name, len(items), times, quality))
    times = {"before": [], "after": []}
    after.read(repeated, cached=True)  # the first sight: read and kept
    for n in range(20):
        for path in (("before", "after") if n % 2 == 0 else ("after", "before")):
            t = time.perf_counter()
            _ = before(repeated) if path == "before" else after.read(repeated, cached=True).text
            times[path].append((time.perf_counter() - t) * 1000)
    rows.append(("repeated photo", 20, times, None))
    stats = after.cache.stats() if after.cache else None
    after.close()
    print(f"OCR cache after the run: {stats}")
    return rows


def print_ocr(rows: list[tuple]) -> None:
    goals = {"display": "<= 100", "no text": "<= 25", "repeated photo": "<= 1"}
    print("\n| photos | n | before p50 / p95 ms | after p50 / p95 ms | after / before p50 | read before | read after | "
          "goal (after p50 ms) |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, n, times, quality in rows:
        b, a = times["before"], times["after"]
        q = ("–", "–") if quality is None else tuple(
            f"{sum(quality[p]):.0f}/{n}" if name != "scanned page" else f"{statistics.mean(quality[p]):.3f} words"
            for p in ("before", "after"))
        print(f"| {name} | {n} | {pct(b, .5):.1f} / {pct(b, .95):.1f} | {pct(a, .5):.1f} / {pct(a, .95):.1f} | "
              f"{pct(a, .5) / pct(b, .5):.3f} | {q[0]} | {q[1]} | {goals.get(name, '–')} |")


# ------------------------------------------------------------------------------------- /v1/search
def search_rows(photos: list[bytes], tiny: bool, backend: str) -> tuple[list[float], list[float], dict[str, list]]:
    from server.app import create_app
    from tests.support.fixtures_server import UvicornThread
    from tests.support.settings import make_settings
    from tests.support.tiny_clip import write_tiny_clip_config
    from tests.support.vllm_server import free_port

    tmp = Path(tempfile.mkdtemp(prefix="bench-ocr-"))
    model = str(write_tiny_clip_config(tmp)) if tiny else "ViT-B-32"
    servers = {}
    try:
        for name, on in (("on", True), ("off", False)):
            settings = make_settings(tmp / name, Path(model), clip_model=model, clip_backend=backend,
                                     embed_cache_entries=0, ocr_query_enabled=on, ocr_enabled=False,
                                     retrieval_pool=20, retrieval_k=5)
            server = UvicornThread(create_app(settings), free_port())
            server.start()
            servers[name] = server
        urls = {name: f"http://127.0.0.1:{s.server.config.port}" for name, s in servers.items()}
        times: dict[str, list[float]] = {"on": [], "off": []}
        stages: dict[str, list] = {"on": [], "off": []}
        with httpx.Client(timeout=120) as http:
            bodies = [{"text": "what does this mean?", "image": "data:image/jpeg;base64," + base64.b64encode(p).decode(),
                       "scorer": "clip"} for p in photos]
            for body in bodies[:3]:  # warm-up (model loads, first OCR)
                for url in urls.values():
                    http.post(f"{url}/v1/search", json=body).raise_for_status()
            for n, body in enumerate(bodies[3:]):
                for name in (("on", "off") if n % 2 == 0 else ("off", "on")):
                    t = time.perf_counter()
                    r = http.post(f"{urls[name]}/v1/search", json=body)
                    times[name].append((time.perf_counter() - t) * 1000)
                    r.raise_for_status()
                    stages[name].append(r.json().get("timings", {}))
        return times["on"], times["off"], stages
    finally:
        for server in servers.values():
            server.stop()


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=12, help="product lines of the support KB generator")
    parser.add_argument("--quick", action="store_true", help="4 devices, fewer photos, tiny CLIP for the search rows")
    parser.add_argument("--backend", choices=["onnx", "torch"], default="onnx", help="CLIP backend of the search rows")
    parser.add_argument("--no-search", action="store_true", help="only the per-photo OCR rows")
    args = parser.parse_args()
    devices = 4 if args.quick else args.devices
    snippets, queries = build_support_kb(devices, seed=0)
    decode = lambda data: Image.open(io.BytesIO(data)).convert("RGB")  # noqa: E731
    display = [(decode(q.image), q.identifier) for q in queries if q.image is not None]
    kb_photos = [(decode(s.image), s.shows[0]) for s in snippets if s.image is not None]
    n_blank = 10 if args.quick else 24
    blank = [(no_text_photo(*((1024, 768) if i % 2 else (640, 480)), seed=i), None) for i in range(n_blank)]
    pages = [page_photo(i) for i in range(2 if args.quick else 4)]
    grounds = ((196, 192, 188), (130, 132, 150))
    labels = [label_photo(big, small, grounds[i % 2], seed=i)
              for i, (big, small) in enumerate((b, s) for b in (28, 32, 36) for s in (16, 20) for _ in (0, 1))]
    print(f"bench_ocr: {devices} devices; {os.cpu_count()} CPUs, load average "
          f"{'/'.join(f'{x:.2f}' for x in os.getloadavg())} at start (a shared box: compare within the run)")
    rows = ocr_rows({"display": display, "kb photos": kb_photos, "no text": blank, "scanned page": pages,
                     "small labels": labels},
                    display[0][0])
    print_ocr(rows)
    print(f"load average after the OCR rows: {'/'.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.no_search:
        return 0
    mixed = [jpeg(img) for pair in zip([d for d, _ in display], [b for b, _ in blank] * 4) for img in pair]
    mixed = mixed[: (16 if args.quick else 48) + 3]
    on, off, stages = search_rows(mixed, tiny=args.quick, backend=args.backend)
    ocr_ms = [s.get("ocr", 0.0) for s in stages["on"]]
    embed = {k: [s.get("embed", 0.0) for s in v] for k, v in stages.items()}
    print(f"\nimage /v1/search ({'tiny CLIP' if args.quick else 'ViT-B-32'}, {args.backend}, query cache off, "
          f"{len(on)} distinct photos, half display / half no text, alternating servers):")
    print("| path | p50 ms | p95 ms | server embed p50 | server ocr p50 |")
    print("|---|---:|---:|---:|---:|")
    print(f"| OCR on (default) | {pct(on, .5):.1f} | {pct(on, .95):.1f} | {pct(embed['on'], .5):.1f} | "
          f"{pct(ocr_ms, .5):.1f} |")
    print(f"| OCR off | {pct(off, .5):.1f} | {pct(off, .95):.1f} | {pct(embed['off'], .5):.1f} | – |")
    print(f"ratio on / off p50: {pct(on, .5) / pct(off, .5):.2f} (goal <= 1.5); load average "
          f"{'/'.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
