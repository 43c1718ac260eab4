"""OCR of text in images (display photos, labels, scanned pages) with rapidocr 3.10 on onnxruntime.

rapidocr's wheel ships the PP-OCRv6 small detection and recognition models and the text-direction
classifier as ONNX files: we point it at them explicitly, so it never tries its model download.
``OcrEngine`` loads them once, lazily, under a lock (~0.5 s plus ~1 s of imports), and runs every
read on its one worker thread: onnxruntime already spreads one inference over the cores, and the
worker is where a timeout can be enforced without killing anything.

Bounds, so a read stays within a few hundred ms and never takes the caller down:

- pixels: more than ``max_pixels`` is refused (``PayloadTooLarge``); a long side over ``max_side``
  is scaled down first (recognition crops come from this image, so small print keeps its detail);
  detection itself runs on at most ``detect_side`` px (rapidocr's ``limit_type: max``; its default
  *upscales* every image to a 736 px short side, 2.5x the work for an 800x480 photo);
- shape: an aspect ratio over ``max_aspect`` is refused (rapidocr would upscale its short side to
  30 px, making the long side enormous); an image under 8 px a side has nothing to read;
- time: ``timeout_s`` per read (``ModelUnavailable`` when exceeded: the worker finishes that read in
  the background) and at most ``max_pending`` reads queued (``Overloaded`` beyond);
- errors: a corrupt image is ``UnprocessableInput``; anything the engine raises is
  ``UpstreamError`` (code ``ocr_failed``); a missing package or model file is
  ``ConfigurationError``. Callers at query time turn any of them into ``degraded: ["ocr"]``.

Boxes are four (x, y) corners in the pixels of the image passed in, whatever scaling happened.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image

from retriever.errors import (
    ConfigurationError,
    ModelUnavailable,
    Overloaded,
    PayloadTooLarge,
    UnprocessableInput,
    UpstreamError,
    VlmragError,
)

log = logging.getLogger(__name__)

#: The model files inside the rapidocr 3.10.0 wheel (its ``models/`` folder).
DET_MODEL = "PP-OCRv6_det_small.onnx"
REC_MODEL = "PP-OCRv6_rec_small.onnx"
CLS_MODEL = "ch_ppocr_mobile_v2.0_cls_mobile.onnx"
#: Below this on either side there is no legible text (and rapidocr's crops degenerate).
_MIN_SIDE = 8


class OcrLine(NamedTuple):
    """One line of text read: its text, recognition confidence in [0, 1], four (x, y) corners."""

    text: str
    score: float
    box: tuple[tuple[float, float], ...]


@dataclass(slots=True)
class OcrResult:
    """The text read from one image, lines in reading order (top to bottom, left to right)."""

    text: str
    lines: list[OcrLine] = field(default_factory=list)
    width: int = 0  # of the image the boxes refer to
    height: int = 0
    elapsed_ms: float = 0.0

    def lines_payload(self) -> list[dict[str, Any]]:
        """The lines as JSON-ready dicts (for a snippet's payload; the KB page can draw the boxes)."""
        return [{"text": line.text, "score": round(line.score, 4), "box": [list(p) for p in line.box]}
                for line in self.lines]


def _current_task_cancelling() -> bool:
    task = asyncio.current_task()
    return bool(task and task.cancelling())


def _models_dir() -> Path:
    import rapidocr

    return Path(rapidocr.__file__).resolve().parent / "models"


class OcrEngine:
    """rapidocr loaded once (lazily, thread-safe) behind size, time and queue bounds (see module doc)."""

    def __init__(
        self, *, max_side: int = 2000, detect_side: int = 960, max_pixels: int = 50_000_000,
        max_aspect: float = 60.0, min_score: float = 0.5, timeout_s: float = 10.0, max_pending: int = 8,
        threads: int | None = None,
    ) -> None:
        if detect_side < 32 or max_side < detect_side:
            raise ConfigurationError(f"OCR sizes need 32 <= detect_side <= max_side, not {detect_side}, {max_side}")
        self.max_side = max_side
        self.detect_side = detect_side
        self.max_pixels = max_pixels
        self.max_aspect = max_aspect
        self.min_score = min_score
        self.timeout_s = timeout_s
        self.max_pending = max_pending
        self.threads = threads
        self._engine: Any = None
        self._load_lock = threading.Lock()
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmrag-ocr")

    # --- loading -------------------------------------------------------------------------------
    def _params(self) -> dict[str, Any]:
        models = _models_dir()
        paths = {name: models / name for name in (DET_MODEL, REC_MODEL, CLS_MODEL)}
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            raise ConfigurationError(f"rapidocr model files are missing: {', '.join(missing)} "
                                     "(reinstall rapidocr==3.10.0, whose wheel ships them)")
        threads = self.threads if self.threads and self.threads > 0 else -1
        return {
            "Global.log_level": "error",  # it logs a warning for every image without text
            "Global.text_score": self.min_score,
            "Global.max_side_len": self.max_side,
            "Det.model_path": str(paths[DET_MODEL]),
            "Cls.model_path": str(paths[CLS_MODEL]),
            "Rec.model_path": str(paths[REC_MODEL]),
            "Det.limit_type": "max",
            "Det.limit_side_len": self.detect_side,
            "EngineConfig.onnxruntime.intra_op_num_threads": threads,
        }

    def _load(self) -> Any:
        if self._engine is None:
            with self._load_lock:
                if self._engine is None:
                    try:
                        from rapidocr import RapidOCR
                    except ImportError as exc:
                        raise ConfigurationError(
                            f"OCR needs rapidocr==3.10.0 and onnxruntime ({exc}); install them or turn OCR off"
                        ) from exc
                    started = time.perf_counter()
                    try:
                        engine = RapidOCR(params=self._params())
                        # rapidocr loads each model on first use; load all three now, once.
                        engine._load_det_model(), engine._load_cls_model(), engine._load_rec_model()
                    except VlmragError:
                        raise
                    except Exception as exc:
                        raise ConfigurationError(f"rapidocr failed to load its models: {exc}") from exc
                    log.info("OCR models loaded in %.2f s", time.perf_counter() - started)
                    self._engine = engine
        return self._engine

    def warm(self) -> None:
        """Load the models now (startup), instead of on the first read."""
        self._load()

    # --- reading -------------------------------------------------------------------------------
    def _prepare(self, image: Image.Image) -> tuple[Image.Image | None, float]:
        """Validate and scale; (None, 1.0) when there is nothing to read. Runs on the worker."""
        try:
            image.load()  # a lazily opened, truncated file fails here, not inside the engine
        except Exception as exc:
            raise UnprocessableInput(f"image cannot be decoded for OCR: {exc}", param="image") from exc
        width, height = image.size
        if width * height > self.max_pixels:
            raise PayloadTooLarge(f"image is {width}x{height} = {width * height} pixels, the OCR limit is "
                                  f"{self.max_pixels}", param="image")
        if min(width, height) < _MIN_SIDE:
            return None, 1.0
        if max(width, height) / min(width, height) > self.max_aspect:
            raise UnprocessableInput(f"image is {width}x{height}: too elongated for OCR (aspect ratio over "
                                     f"{self.max_aspect:g})", param="image")
        if image.mode != "RGB":
            image = image.convert("RGB")
        scale = min(1.0, self.max_side / max(width, height))
        if scale < 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
        return image, scale

    def _read_sync(self, image: Image.Image) -> OcrResult:
        started = time.perf_counter()
        try:
            width, height = image.size
            prepared, scale = self._prepare(image)
            if prepared is None:
                return OcrResult("", [], width, height, (time.perf_counter() - started) * 1000)
            engine = self._load()
            output = engine(prepared)
            # An image without text gives an empty output whose fields are None.
            texts, scores, boxes = (getattr(output, name, None) for name in ("txts", "scores", "boxes"))
            lines = []
            for text, score, box in zip(texts or (), scores or (), () if boxes is None else boxes, strict=False):
                corners = tuple((round(float(x) / scale, 1), round(float(y) / scale, 1)) for x, y in box)
                lines.append(OcrLine(str(text).strip(), float(score), corners))
            lines = [line for line in lines if line.text]
        except VlmragError:
            raise
        except MemoryError as exc:
            raise PayloadTooLarge("image is too large to read (out of memory)", param="image") from exc
        except Exception as exc:  # onnxruntime, OpenCV, pyclipper: no common base
            raise UpstreamError(f"OCR failed: {type(exc).__name__}: {exc}", code="ocr_failed") from exc
        elapsed = (time.perf_counter() - started) * 1000
        return OcrResult("\n".join(line.text for line in lines), lines, width, height, elapsed)

    def _submit(self, image: Image.Image) -> concurrent.futures.Future[OcrResult]:
        with self._pending_lock:
            if self._pending >= self.max_pending:
                raise Overloaded(f"OCR queue is full ({self.max_pending} images waiting)", code="ocr_overloaded")
            self._pending += 1
        try:
            future = self._executor.submit(self._read_sync, image)
        except RuntimeError as exc:  # executor shut down
            self._done(None)
            raise ModelUnavailable("OCR engine is closed", code="ocr_closed") from exc
        future.add_done_callback(self._done)
        return future

    def _done(self, _future: object) -> None:
        with self._pending_lock:
            self._pending -= 1

    def _timed_out(self, timeout: float) -> ModelUnavailable:
        return ModelUnavailable(f"OCR did not finish within {timeout:g} s", code="ocr_timeout", retry_after=1.0)

    def read(self, image: Image.Image, timeout_s: float | None = None) -> OcrResult:
        """Read the text in ``image`` (blocking; from a worker thread or a CLI)."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        future = self._submit(image)
        try:
            return future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()  # still queued: nobody waits for it any more
            raise self._timed_out(timeout) from None
        except concurrent.futures.CancelledError:
            raise ModelUnavailable("OCR engine was closed", code="ocr_closed") from None

    async def aread(self, image: Image.Image, timeout_s: float | None = None) -> OcrResult:
        """Read the text in ``image`` without blocking the event loop (onnxruntime releases the GIL)."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        # wait_for cancels the wrapper on timeout, which cancels a read still queued; a running one
        # cannot be interrupted and finishes in the background.
        future = asyncio.wrap_future(self._submit(image))
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise self._timed_out(timeout) from None
        except asyncio.CancelledError:
            if future.cancelled() and not _current_task_cancelling():
                raise ModelUnavailable("OCR engine was closed", code="ocr_closed") from None
            raise

    def close(self) -> None:
        """Stop taking reads; the one in progress (if any) finishes in the background."""
        self._executor.shutdown(wait=False, cancel_futures=True)
