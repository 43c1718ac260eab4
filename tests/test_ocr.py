"""OCR with the real rapidocr models on images rendered here with a real TrueType font."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import matplotlib
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from retriever.errors import ModelUnavailable, Overloaded, PayloadTooLarge, UnprocessableInput, UpstreamError
from retriever.ocr import OcrEngine, OcrResult
from retriever.ocr_cache import OcrCache

# matplotlib (a dependency) bundles DejaVu Sans, so the font exists wherever the project installs.
FONT_PATH = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
DISPLAY_LINES = ("ERROR E-417", "PUMP P-100-B OVERHEAT")


def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(FONT_PATH), size)


def render_display(lines=DISPLAY_LINES, size=(800, 480), text_px=52, angle=7.0, scale=1) -> Image.Image:
    """A device display: light text on a dark panel, rotated by ``angle`` degrees."""
    width, height = size[0] * scale, size[1] * scale
    image = Image.new("RGB", (width, height), (18, 28, 24))
    draw = ImageDraw.Draw(image)
    for n, line in enumerate(lines):
        draw.text((60 * scale, (120 + n * 130) * scale), line, font=font(text_px * scale), fill=(130, 255, 150))
    return image.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=(18, 28, 24)) if angle else image


def degrade(image: Image.Image, seed: int = 0) -> Image.Image:
    """Sensor noise, a little blur and a low-quality JPEG round trip: a phone photo of the display."""
    rng = np.random.default_rng(seed)
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 14, size=(image.height, image.width, 3))
    blurred = Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.2))
    buffer = io.BytesIO()
    blurred.save(buffer, "JPEG", quality=35)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


@pytest.fixture(scope="module")
def ocr() -> Iterator[OcrEngine]:
    engine = OcrEngine()
    engine.warm()
    yield engine
    engine.close()


def test_font_is_a_real_truetype_font() -> None:
    assert FONT_PATH.is_file() and font(20).getname()[0] == "DejaVu Sans"


def test_reads_a_rotated_display_exactly(ocr: OcrEngine) -> None:
    image = render_display()
    result = ocr.read(image)
    assert [line.text for line in result.lines] == list(DISPLAY_LINES)
    assert result.text == "\n".join(DISPLAY_LINES)
    assert all(line.score > 0.9 for line in result.lines)
    assert (result.width, result.height) == image.size
    first, second = (np.asarray(line.box) for line in result.lines)
    assert first.shape == (4, 2) and first[:, 1].mean() < second[:, 1].mean()  # reading order
    assert (first >= -2).all() and (first[:, 0] <= image.width + 2).all() and (first[:, 1] <= image.height + 2).all()
    # Rotation shows in the box: the right end of the first line sits higher than its left end.
    assert first[1, 1] < first[0, 1] - 10
    json.dumps(result.lines_payload())  # ready for a payload


def test_reads_identifiers_through_noise_blur_and_jpeg(ocr: OcrEngine) -> None:
    image = degrade(render_display(("ERROR E-417", "PART P-100-B", "FW v2.3.1"), angle=-5))
    text = ocr.read(image).text
    for identifier in ("E-417", "P-100-B", "v2.3.1"):
        assert identifier in text


def test_dark_text_on_grey_and_other_modes(ocr: OcrEngine) -> None:
    label = Image.new("L", (520, 160), 200)
    ImageDraw.Draw(label).text((30, 45), "PART P-220-C", font=font(50), fill=20)
    assert ocr.read(label).text == "PART P-220-C"
    assert ocr.read(label.convert("RGBA")).text == "PART P-220-C"


def test_an_image_without_text_reads_nothing(ocr: OcrEngine) -> None:
    result = ocr.read(Image.new("RGB", (320, 200), "white"))
    assert result == OcrResult("", [], 320, 200, result.elapsed_ms)
    assert ocr.read(Image.new("RGB", (5, 400), "white")).lines == []  # too thin to hold text


def test_a_huge_photo_is_scaled_down_and_boxes_map_back(ocr: OcrEngine) -> None:
    image = render_display(angle=0, scale=6)  # 4800 x 2880 px
    result = ocr.read(image)
    assert result.text == "\n".join(DISPLAY_LINES)
    assert (result.width, result.height) == image.size
    box = np.asarray(result.lines[0].box)
    # The first line was drawn from x = 360, y = 720 on the full-size image; a box found by the
    # coarse detection (160 px for this 4800 px photo) is looser by its unclip margin, ~2 % of the side.
    assert abs(box[:, 0].min() - 360) < 150 and abs(box[:, 1].min() - 740) < 150
    assert result.elapsed_ms < 20_000  # detection ran on <= 960 px, not on 14 Mpx


def test_too_many_pixels_is_refused_before_any_model_runs() -> None:
    engine = OcrEngine(max_pixels=1_000_000)
    try:
        with pytest.raises(PayloadTooLarge, match="OCR limit"):
            engine.read(Image.new("RGB", (2000, 1000)))
        assert engine._stages is None  # refused without loading anything
    finally:
        engine.close()


def test_corrupt_and_degenerate_images_are_unprocessable(ocr: OcrEngine) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (300, 300, 3), dtype=np.uint8)).save(buffer, "PNG")
    truncated = Image.open(io.BytesIO(buffer.getvalue()[: len(buffer.getvalue()) // 2]))
    with pytest.raises(UnprocessableInput, match="decoded"):
        ocr.read(truncated)
    with pytest.raises(UnprocessableInput, match="elongated"):
        ocr.read(Image.new("RGB", (6000, 20), "white"))
    assert ocr.read(render_display()).lines  # the engine is unharmed


def test_engine_errors_become_upstream_error(ocr: OcrEngine) -> None:
    engine = OcrEngine()

    def explode(*_args):
        raise RuntimeError("onnxruntime: bad input")

    engine._stages = SimpleNamespace(read=explode)
    try:
        with pytest.raises(UpstreamError, match="bad input") as caught:
            engine.read(render_display())
        assert caught.value.code == "ocr_failed"
    finally:
        engine.close()


def test_timeout_and_queue_bounds(ocr: OcrEngine) -> None:
    image = render_display()
    with pytest.raises(ModelUnavailable) as caught:
        ocr.read(image, timeout_s=0.001)
    assert caught.value.code == "ocr_timeout"
    assert ocr.read(image).text  # the worker carried on

    engine = OcrEngine(max_pending=1)
    engine._stages = ocr._stages  # share the loaded models
    try:
        running = engine._submit(image, engine.photo_policy, None)
        with pytest.raises(Overloaded):
            engine.read(image)
        assert running.result(timeout=30).text
        assert engine.read(image).text  # the slot is free again
    finally:
        engine.close()
    with pytest.raises(ModelUnavailable):
        engine.read(image)


async def test_aread_runs_off_the_event_loop(ocr: OcrEngine) -> None:
    first, second = render_display(), render_display(("CODE E-102",), angle=-4)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    started = time.perf_counter()
    try:
        results = await asyncio.gather(*(ocr.aread(image) for image in (first, second, first, second)))
    finally:
        elapsed = time.perf_counter() - started
        task.cancel()
    assert results[0].text == "\n".join(DISPLAY_LINES) and results[1].text == "CODE E-102"
    # the loop kept ticking while the models worked: a blocked loop ticks ~once, whatever the OCR time
    assert ticks >= max(2, int(0.4 * elapsed / 0.01)), (ticks, elapsed)
    with pytest.raises(ModelUnavailable):
        await ocr.aread(first, timeout_s=0.001)


def test_the_cache_never_returns_another_photos_text(ocr: OcrEngine) -> None:
    cache = OcrCache(8, 1 << 20)
    engine = OcrEngine(cache=cache)
    engine._stages = ocr._stages  # share the loaded models
    try:
        first = render_display(("ERROR E-417",), angle=0)
        second = first.copy()  # the same photo, but one region says something else
        ImageDraw.Draw(second).rectangle((40, 100, 780, 220), fill=(18, 28, 24))
        ImageDraw.Draw(second).text((60, 120), "ERROR E-418", font=font(52), fill=(130, 255, 150))
        assert engine.read(first, cached=True).text == "ERROR E-417"
        assert engine.read(second, cached=True).text == "ERROR E-418"
        assert (cache.stats().hits, cache.stats().misses) == (0, 2)
        again = engine.read(first.convert("RGBA").convert("RGB"), cached=True)  # same pixels, another object
        assert again.text == "ERROR E-417" and cache.stats().hits == 1
        assert engine.read(second, cached=True).text == "ERROR E-418" and cache.stats().hits == 2
        engine.read(first)  # not asked to: neither looked up nor counted
        assert cache.stats().hits + cache.stats().misses == 4
    finally:
        engine.close()


def test_cache_bounds_by_entries_and_bytes() -> None:
    cache = OcrCache(2, 10_000)
    results = [OcrResult(f"text {i}", []) for i in range(3)]
    for i, result in enumerate(results):
        cache.put(f"k{i}", result)
    assert cache.get("k0") is None and cache.get("k2") is results[2] and cache.stats().evictions == 1
    cache.put("big", OcrResult("x" * 20_000, []))  # larger than the byte bound: not kept
    assert cache.get("big") is None and len(cache) == 2 and cache.stats().bytes <= 10_000


def test_thousands_of_boxes_are_refused_before_recognition(ocr: OcrEngine) -> None:
    # A page of tiny separate tokens: detection finds hundreds of boxes; the bound stops the read
    # before any recognition, quickly, with a clear code (query time turns it into degraded: ["ocr"]).
    image = Image.new("RGB", (1600, 1200), "white")
    draw = ImageDraw.Draw(image)
    for row in range(40):
        for col in range(16):
            draw.text((20 + col * 98, 10 + row * 29), f"A{row}{col}", font=font(18), fill="black")
    engine = OcrEngine(max_boxes=100, detect_side=960)
    engine._stages = ocr._stages
    try:
        for page in (True, False):  # a query photo: found by the small-print detection, bounded alike
            started = time.perf_counter()
            with pytest.raises(UnprocessableInput) as caught:
                engine.read(image, page=page)
            assert caught.value.code == "ocr_too_many_boxes" and "text boxes" in caught.value.message
            assert time.perf_counter() - started < 5  # detection only (recognising 640 boxes takes ~10 s)
    finally:
        engine.close()


def test_a_photo_without_text_stops_after_one_small_detection(ocr: OcrEngine) -> None:
    rng = np.random.default_rng(5)
    photo = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((1024, 768), Image.BICUBIC)
    result = ocr.read(photo)
    assert result.text == "" and result.stages is not None
    assert result.stages.sides == (160,) and result.stages.recognize_ms == 0.0  # no recognition ran


def test_metrics_export_the_ocr_cache_counters() -> None:
    from server.metrics import Metrics

    cache = OcrCache(4, 1 << 16)
    cache.put("a", OcrResult("E-417", []))
    cache.get("a"), cache.get("b")
    metrics = Metrics()
    assert b"vlmrag_ocr_cache_hits_total 0.0" in metrics.render()  # nothing watched yet: zeros
    metrics.watch_ocr_cache(cache)
    text = metrics.render().decode()
    assert "vlmrag_ocr_cache_hits_total 1.0" in text and "vlmrag_ocr_cache_misses_total 1.0" in text
    assert "vlmrag_ocr_cache_entries 1.0" in text


def render_page(lines: int = 20, size=(1024, 1400), text_px: int = 22, seed: int = 0) -> tuple[Image.Image, list[str]]:
    """A printed page photographed whole: ``lines`` lines of small dark print on paper."""
    rng = np.random.default_rng(seed)
    vocab = ["pump", "valve", "error", "reset", "firmware", "sensor", "pressure", "filter", "module", "heater", "display", "relay"]
    image = Image.new("RGB", size, (248, 247, 240))
    draw, words = ImageDraw.Draw(image), []
    for n in range(lines):
        line = " ".join(rng.choice(vocab, 6)) + f" E-{100 + 37 * n}"
        draw.text((70, 90 + n * int(text_px * 2.6)), line, font=font(text_px), fill=(25, 25, 25))
        words += line.split()
    return image, words


def recall(text: str, words: list[str]) -> float:
    got = set(text.lower().split())
    return sum(word.lower() in got for word in words) / len(words)


def test_a_photographed_page_as_a_query_photo_is_read(ocr: OcrEngine) -> None:
    # Its print (22 px on a 1400 px photo) is too small for the 160 px early-exit detection; the
    # edge-density check sends it to a second detection at the fine budget instead of reading nothing.
    image, words = render_page()
    photo = ocr.read(image, timeout_s=120)
    page = ocr.read(image, timeout_s=120, page=True)
    assert photo.stages is not None and len(photo.stages.sides) == 2 and photo.stages.sides[0] == 160
    assert recall(photo.text, words) >= 0.95 and recall(photo.text, words) >= recall(page.text, words) - 0.03
    assert "E-100" in photo.text.split() and f"E-{100 + 37 * 19}" in photo.text.split()  # first and last line
    sparse, sparse_words = render_page(lines=8, text_px=14)  # fewer, smaller lines: fewer edges
    assert recall(ocr.read(sparse, timeout_s=120).text, sparse_words) >= 0.95


def test_the_small_print_check_leaves_smooth_photos_alone() -> None:
    from retriever.ocr_stages import fine_detail

    rng = np.random.default_rng(2)
    smooth = np.asarray(Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((1024, 768), Image.BICUBIC),
                        dtype=np.float32) + rng.normal(0, 12, (768, 1024, 3))
    assert fine_detail(Image.fromarray(smooth.clip(0, 255).astype(np.uint8))) < 0.005  # grain is not print
    assert fine_detail(render_page()[0]) > 0.05


def test_a_block_over_grain_is_no_text_and_costs_no_recognition(ocr: OcrEngine) -> None:
    # Grain on a smooth colour field (bench_ocr's no-text photo, seed 4): the 160 px detection takes
    # the whole photo for one text block. It has no strong edge, so nothing is recognised (it used
    # to read a false "一" after a recognition and a 448 px fine pass, ~300 ms).
    rng = np.random.default_rng(4)
    base = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((640, 480), Image.BICUBIC)
    grain = np.asarray(base, dtype=np.float32) + rng.normal(0, 12, (480, 640, 3))
    result = ocr.read(Image.fromarray(grain.clip(0, 255).astype(np.uint8)))
    assert result.stages is not None and result.stages.boxes >= 1  # the detector did see a "block"
    assert result.text == "" and result.stages.sides == (160,) and result.stages.recognize_ms == 0.0
    label = Image.new("RGB", (640, 480), (200, 200, 190))  # a close-up label: a block with real print
    ImageDraw.Draw(label).text((40, 180), "PART P-220-C", font=font(80), fill=(20, 20, 20))
    assert ocr.read(label).text == "PART P-220-C"



def small_tilted_label(big: int = 36, small: int = 20, ground: tuple[int, int, int] = (130, 132, 150)) -> Image.Image:
    """A two-line part label across a third of a 714 x 591 photo, tilted 8 degrees (as bench_ocr's
    KB photo P-162-C, which the staged read once lost)."""
    rng = np.random.default_rng(7)
    photo = np.full((591, 714, 3), ground, np.float32) + rng.normal(0, 6, (591, 714, 3))
    image = Image.fromarray(photo.clip(0, 255).astype(np.uint8))
    label = Image.new("RGB", (290, 120), (242, 242, 240))
    draw = ImageDraw.Draw(label)
    draw.text((22, 14), "P-162-C", font=font(big), fill=(25, 25, 25))
    draw.text((22, 74), "door seal", font=font(small), fill=(25, 25, 25))
    image.paste(label.rotate(-8, expand=True, resample=Image.Resampling.BICUBIC, fillcolor=ground), (210, 200))
    return image.filter(ImageFilter.GaussianBlur(0.8))


def read_with(ocr: OcrEngine, image: Image.Image, **policy: Any) -> OcrResult:
    from retriever.ocr_stages import StagePolicy

    default, ocr.photo_policy = ocr.photo_policy, StagePolicy(**policy)
    try:
        return ocr.read(image)
    finally:
        ocr.photo_policy = default


def test_a_small_label_the_coarse_pass_cannot_box_is_looked_at_again(ocr: OcrEngine) -> None:
    # At 160 px its lines are ~7 px high: the probability map peaks over them but no box survives,
    # and the photo has too few strong edges for the small-print check. The peak sends it to one
    # more detection at twice the coarse side, which boxes and reads it.
    image = small_tilted_label(32, 20)
    result = ocr.read(image)
    assert "P-162-C" in result.text and "door seal" in result.text
    assert result.stages is not None and result.stages.sides == (160, 320)
    blind = read_with(ocr, image, small_text_peak=0.0)  # without the peak's second look
    assert blind.text == "" and blind.stages is not None and blind.stages.sides == (160,)


@pytest.mark.parametrize(("big", "small", "ground"), [(28, 16, (196, 192, 188)), (32, 16, (130, 132, 150))])
def test_a_label_seen_as_one_block_is_detected_again_before_it_is_read(
    ocr: OcrEngine, big: int, small: int, ground: tuple[int, int, int],
) -> None:
    # At 160 px both lines merge into one box that reads the big line only (or misreads it:
    # "P.2622"); boxes are found again at read_side (320) before recognition.
    image = small_tilted_label(big, small, ground)
    result = ocr.read(image)
    assert result.text.split("\n") == ["P-162-C", "door seal"]
    assert result.stages is not None and result.stages.sides[:2] == (160, 320)
    coarse_only = read_with(ocr, image, read_side=0)
    assert coarse_only.text.split("\n") != ["P-162-C", "door seal"]
