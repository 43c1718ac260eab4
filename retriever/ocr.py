"""OCR of text in images (display photos, labels, scanned pages) with rapidocr 3.10 on onnxruntime.

rapidocr's wheel ships the PP-OCRv6 small detection and recognition models and the text-direction
classifier as ONNX files; ``retriever/ocr_stages.py`` drives them stage by stage (detection on a
reduced image first decides what else runs: a photo without text costs one small detection).
``OcrEngine`` loads them once, lazily, under a lock (~0.5 s plus ~1 s of imports), and runs every
read on its one worker thread: onnxruntime spreads one inference over ``threads`` cores, and the
worker is where a deadline can be enforced without killing anything. Query photos can go through
an ``OcrCache`` (``retriever/ocr_cache.py``): a photo seen again is not read again.

Bounds, so a read stays within a few hundred ms and never takes the caller down:

- pixels: more than ``max_pixels`` is refused (``PayloadTooLarge``); a long side over ``max_side``
  is scaled down first (recognition crops come from this image, so small print keeps its detail);
  detection runs at ``coarse_side`` px first and at most ``detect_side`` px (pages: at once);
- shape: an aspect ratio over ``max_aspect`` is refused; an image under 8 px a side has nothing
  to read;
- boxes: more than ``max_boxes`` text boxes is ``UnprocessableInput`` (code ``ocr_too_many_boxes``)
  before any recognition (noise, a page printed at a tiny scale);
- time: ``timeout_s`` per read, queue wait included (``ModelUnavailable``, code ``ocr_timeout``):
  the read itself stops at its deadline between stages, and at most ``max_pending`` reads are
  queued (``Overloaded`` beyond);
- errors: a corrupt image is ``UnprocessableInput``; anything the engine raises is
  ``UpstreamError`` (code ``ocr_failed``); a missing package or model file is
  ``ConfigurationError``. Callers at query time turn any of them into ``degraded: ["ocr"]``.

Boxes are four (x, y) corners in the pixels of the image passed in, whatever scaling happened.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

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
from retriever.ocr_cache import OcrCache, pixel_key
from retriever.ocr_stages import StagePolicy, StageTimes

if TYPE_CHECKING:
    from retriever.ocr_stages import OcrStages

log = logging.getLogger(__name__)

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
    stages: StageTimes | None = field(default=None, compare=False)  # what each stage cost (None: nothing ran, or a cache hit)

    def lines_payload(self) -> list[dict[str, Any]]:
        """The lines as JSON-ready dicts (for a snippet's payload; the KB page can draw the boxes)."""
        return [{"text": line.text, "score": round(line.score, 4), "box": [list(p) for p in line.box]}
                for line in self.lines]


def _current_task_cancelling() -> bool:
    task = asyncio.current_task()
    return bool(task and task.cancelling())


class OcrEngine:
    """rapidocr's stages loaded once (lazily, thread-safe) behind size, box, time and queue bounds."""

    def __init__(
        self, *, max_side: int = 2000, detect_side: int = 960, coarse_side: int = 160,
        max_pixels: int = 50_000_000, max_aspect: float = 60.0, min_score: float = 0.5, timeout_s: float = 10.0,
        max_pending: int = 8, max_boxes: int = 300, threads: int | None = None, cache: OcrCache | None = None,
    ) -> None:
        if not 32 <= coarse_side <= detect_side <= max_side:
            raise ConfigurationError("OCR sizes need 32 <= coarse_side <= detect_side <= max_side, not "
                                     f"{coarse_side}, {detect_side}, {max_side}")
        self.max_side = max_side
        self.detect_side = detect_side
        self.max_pixels = max_pixels
        self.max_aspect = max_aspect
        self.timeout_s = timeout_s
        self.max_pending = max_pending
        self.threads = threads
        self.cache = cache if cache is not None and cache.enabled else None
        self.photo_policy = StagePolicy(coarse_side=coarse_side, fine_side=detect_side, min_score=min_score,
                                        max_boxes=max_boxes)
        self.page_policy = StagePolicy.page(detect_side)
        self.page_policy.min_score, self.page_policy.max_boxes = min_score, max_boxes
        self._stages: OcrStages | None = None
        self._load_lock = threading.Lock()
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmrag-ocr")

    # --- loading -------------------------------------------------------------------------------
    def _load(self) -> OcrStages:
        if self._stages is None:
            with self._load_lock:
                if self._stages is None:
                    try:
                        from retriever.ocr_stages import OcrStages
                    except ImportError as exc:
                        raise ConfigurationError(
                            f"OCR needs rapidocr==3.10.0 and onnxruntime ({exc}); install them or turn OCR off"
                        ) from exc
                    started = time.perf_counter()
                    try:
                        stages = OcrStages(self.threads or max(1, (os.cpu_count() or 2) // 2))
                    except VlmragError:
                        raise
                    except Exception as exc:
                        raise ConfigurationError(f"rapidocr failed to load its models: {exc}") from exc
                    log.info("OCR models loaded in %.2f s", time.perf_counter() - started)
                    self._stages = stages
        return self._stages

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

    def _read_sync(self, image: Image.Image, policy: StagePolicy, deadline: float | None = None) -> OcrResult:
        started = time.perf_counter()
        try:
            width, height = image.size
            prepared, scale = self._prepare(image)
            if prepared is None:
                return OcrResult("", [], width, height, (time.perf_counter() - started) * 1000)
            stages = self._load()
            found, times = stages.read(prepared, policy, deadline)
            lines = [OcrLine(text, score, tuple((round(float(x) / scale, 1), round(float(y) / scale, 1))
                                                for x, y in box))
                     for text, score, box in found]
        except VlmragError:
            raise
        except MemoryError as exc:
            raise PayloadTooLarge("image is too large to read (out of memory)", param="image") from exc
        except Exception as exc:  # onnxruntime, OpenCV, pyclipper: no common base
            raise UpstreamError(f"OCR failed: {type(exc).__name__}: {exc}", code="ocr_failed") from exc
        elapsed = (time.perf_counter() - started) * 1000
        return OcrResult("\n".join(line.text for line in lines), lines, width, height, elapsed, times)

    def _submit(self, image: Image.Image, policy: StagePolicy, deadline: float | None,
                ) -> concurrent.futures.Future[OcrResult]:
        with self._pending_lock:
            if self._pending >= self.max_pending:
                raise Overloaded(f"OCR queue is full ({self.max_pending} images waiting)", code="ocr_overloaded")
            self._pending += 1
        try:
            future = self._executor.submit(self._read_sync, image, policy, deadline)
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

    def _cached(self, image: Image.Image, policy: StagePolicy, use_cache: bool) -> tuple[str | None, OcrResult | None]:
        if not use_cache or self.cache is None:
            return None, None
        try:
            key = pixel_key(image, policy.key())
        except Exception:  # noqa: BLE001 - an undecodable image: the read reports it properly
            return None, None
        return key, self.cache.get(key)

    def read(self, image: Image.Image, timeout_s: float | None = None, *, page: bool = False,
             cached: bool = False) -> OcrResult:
        """Read the text in ``image`` (blocking; from a worker thread or a CLI).

        ``page``: a scanned page (dense small print: no early exit at a small size); ``cached``: look
        the photo up in the engine's cache first and keep the reading there (query photos).
        """
        timeout = self.timeout_s if timeout_s is None else timeout_s
        policy = self.page_policy if page else self.photo_policy
        key, hit = self._cached(image, policy, cached)
        if hit is not None:
            return hit
        future = self._submit(image, policy, time.perf_counter() + timeout)
        try:
            result = future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()  # still queued: nobody waits for it any more
            raise self._timed_out(timeout) from None
        except concurrent.futures.CancelledError:
            raise ModelUnavailable("OCR engine was closed", code="ocr_closed") from None
        if key is not None and self.cache is not None:
            self.cache.put(key, result)
        return result

    async def aread(self, image: Image.Image, timeout_s: float | None = None, *, page: bool = False,
                    cached: bool = False) -> OcrResult:
        """Read the text in ``image`` without blocking the event loop (onnxruntime releases the GIL)."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        policy = self.page_policy if page else self.photo_policy
        key, hit = await asyncio.to_thread(self._cached, image, policy, cached)
        if hit is not None:
            return hit
        # wait_for cancels the wrapper on timeout, which cancels a read still queued; a running one
        # stops at its deadline, between stages.
        future = asyncio.wrap_future(self._submit(image, policy, time.perf_counter() + timeout))
        try:
            result = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise self._timed_out(timeout) from None
        except asyncio.CancelledError:
            if future.cancelled() and not _current_task_cancelling():
                raise ModelUnavailable("OCR engine was closed", code="ocr_closed") from None
            raise
        if key is not None and self.cache is not None:
            self.cache.put(key, result)
        return result

    def close(self) -> None:
        """Stop taking reads; the one in progress (if any) finishes in the background."""
        self._executor.shutdown(wait=False, cancel_futures=True)
