"""OCR with the real rapidocr models on images rendered here with a real TrueType font."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import matplotlib
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from retriever.errors import ModelUnavailable, Overloaded, PayloadTooLarge, UnprocessableInput, UpstreamError
from retriever.ocr import OcrEngine, OcrResult

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
    try:
        results = await asyncio.gather(ocr.aread(first), ocr.aread(second))
    finally:
        task.cancel()
    assert results[0].text == "\n".join(DISPLAY_LINES) and results[1].text == "CODE E-102"
    assert ticks >= 5  # the loop kept running while the models worked
    with pytest.raises(ModelUnavailable):
        await ocr.aread(first, timeout_s=0.001)
