"""The OCR stages, driven one by one: detection decides what else runs.

rapidocr's ``RapidOCR.__call__`` runs detection at a fixed size (by default it *upscales* every
image to a 736 px short side), then the direction classifier on every box, then recognition; on
2 cores PP-OCRv6's detector alone costs ~440 ms at 960 px, and a photo without text paid it all.
Here the same three rapidocr objects (``TextDetector``, ``TextClassifier``, ``TextRecognizer``,
models from its wheel) run on ONNX Runtime sessions built by us (intra-op threads chosen for the
box, no spin-waiting), in this order:

1. **coarse detection** on the image reduced (area averaging) to ``coarse_side`` px on its long
   side (~15 ms at 160 px). Text lower than ~1/40 of the photo's long side (a whole printed page
   photographed) is not seen at 160 px, so a photo without a box there gets one cheap check
   (``fine_detail``: the share of strong grey-level edges at 320 px, ~3 ms): small print has many
   (0.01-0.15), a smooth photo almost none. Over ``detail_edges``: one detection of the whole image
   at the fine budget (``fine_side``, ``fine_pixels``: ~200 ms). Otherwise done, nothing else runs;
   this is most product photos. Boxes that all span most of the photo (``_all_blocks``: grain or a
   gradient taken for one block) on a photo with almost no strong edge (``block_edges``) are no
   text either: done, without the recognition and fine pass they used to cost (~250 ms). No box but
   a probability map that peaked over ``small_text_peak`` (a small label whose lines are too thin to
   make a box at 160 px) gets one detection at twice ``coarse_side``. Boxes found at ``coarse_side``
   are detected again at ``read_side`` (320 px, ~12 ms) before they are read: at 160 px the two lines
   of a small label merge into one block that reads its biggest line only, or misreads it.
2. **recognition** of the detected boxes only, cropped from the full-resolution image (small print
   keeps its detail), batched (sorted by aspect ratio, padded per batch).
3. **fine detection**, only where boxes were read poorly (a label found as one block, a page whose
   lines merged): the region around them is detected again,
   at up to ``fine_side`` px and ``fine_pixels`` pixels, and its new boxes recognised.
4. **direction classifier** only for the lines still read poorly: a crop it finds upside down is
   turned and read again, the better reading kept.

A page (a scanned PDF page at ingestion) skips the coarse pass: ``StagePolicy.page()`` detects at
``fine_side`` at once, as dense small print needs.

Bounds: more than ``max_boxes`` boxes (noise, a page printed at a tiny scale) raise
``UnprocessableInput`` (code ``ocr_too_many_boxes``) before any recognition, and a ``deadline``
(a ``time.perf_counter()`` value) is checked between the stages and the recognition batches
(``ModelUnavailable``, code ``ocr_timeout``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image
from rapidocr.ch_ppocr_det.utils import DetPreProcess

from retriever.errors import ModelUnavailable, UnprocessableInput

#: The model files inside the rapidocr 3.10.0 wheel (its ``models/`` folder).
DET_MODEL = "PP-OCRv6_det_small.onnx"
REC_MODEL = "PP-OCRv6_rec_small.onnx"
CLS_MODEL = "ch_ppocr_mobile_v2.0_cls_mobile.onnx"


@dataclass(slots=True)
class StagePolicy:
    """Sizes and thresholds of the staged read (chosen with ``benchmarks/bench_ocr.py``)."""

    coarse_side: int = 160  # long side (px) of the first, early-exit detection
    fine_side: int = 960  # the longest side the second detection may use
    fine_pixels: int = 150_000  # and the most pixels (~80 ms of detection on 2 cores; the page policy: more)
    max_boxes: int = 300
    min_score: float = 0.5  # lines read with less are dropped (after the classifier's second chance)
    rec_batch: int = 8
    # No box at coarse_side, but this fraction of pixels (at 320 px) has a strong edge: small print
    # (a printed page photographed) is likely, and one detection at the fine budget looks for it.
    detail_edges: float = 0.01  # 0: no second look (pure early exit)
    # Coarse boxes that all span most of the photo (grain or a smooth gradient the detector takes for
    # one block) on a photo with under this share of strong edges: no text, nothing else runs.
    block_edges: float = 0.005  # 0: such blocks go to recognition and the fine pass (~250 ms)
    # No box at coarse_side, too little detail for small print, but the probability map peaked over
    # this: a text-like region too small to make a box there (a label across a fifth of a photo, a
    # little tilted). One detection at twice coarse_side (~10 ms) looks again. 0: no such look.
    small_text_peak: float = 0.5
    # Boxes found at coarse_side are detected again at this side (0: no) before recognition: at 160
    # px the lines of a small label merge into one block that reads its biggest line only.
    read_side: int = 320

    @classmethod
    def page(cls, side: int = 960) -> StagePolicy:
        """Dense small print: one detection at ``side`` (no early exit at a small size)."""
        return cls(coarse_side=side, fine_side=side, fine_pixels=side * side)

    def key(self) -> str:
        """What a cached reading depends on."""
        return (f"{self.coarse_side}/{self.fine_side}/{self.fine_pixels}/{self.min_score}/{self.max_boxes}/"
                f"{self.detail_edges}/{self.block_edges}/{self.small_text_peak}/{self.read_side}")


@dataclass(slots=True)
class StageTimes:
    """Milliseconds per stage of one read, and the detection sides used."""

    detect_ms: float = 0.0
    recognize_ms: float = 0.0
    classify_ms: float = 0.0
    sides: tuple[int, ...] = ()
    boxes: int = 0
    active_peak: float = 0.0  # the coarse probability map's maximum


def models_dir() -> Path:
    import rapidocr

    return Path(rapidocr.__file__).resolve().parent / "models"


def session_options(threads: int, spinning: bool = False) -> Any:
    """ORT options: ``threads`` intra-op threads (0: ORT's default), no spin-waiting unless asked."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_cpu_mem_arena = False  # detection inputs change size with every photo
    options.inter_op_num_threads = 1
    if threads > 0:
        options.intra_op_num_threads = threads
    # Spinning workers burn a core between runs that CLIP, the event loop and the store need.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return options


class OcrStages:
    """rapidocr's detector, classifier and recogniser on our sessions (load: ~0.5 s; not thread-safe)."""

    def __init__(self, threads: int = 0, *, spinning: bool = False) -> None:
        import onnxruntime as ort
        import rapidocr
        from rapidocr.ch_ppocr_cls import TextClassifier
        from rapidocr.ch_ppocr_det import TextDetector
        from rapidocr.ch_ppocr_rec import TextRecognizer
        from rapidocr.utils.log import logger as rapidocr_log
        from rapidocr.utils.parse_parameters import ParseParams

        folder = models_dir()
        paths = {name: folder / name for name in (DET_MODEL, REC_MODEL, CLS_MODEL)}
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            from retriever.errors import ConfigurationError

            raise ConfigurationError(f"rapidocr model files are missing: {', '.join(missing)} "
                                     "(reinstall rapidocr==3.10.0, whose wheel ships them)")
        rapidocr_log.setLevel("ERROR")  # it logs every session it builds and every image without text
        cfg = ParseParams.load(Path(rapidocr.__file__).resolve().parent / "config.yaml")
        options = session_options(threads, spinning)

        def section(name: str, model: str) -> Any:
            part = cfg[name]
            part._set_flag("allow_objects", True)
            part.engine_cfg = cfg.EngineConfig.onnxruntime
            part.model_root_dir = str(folder)
            part.model_path = str(paths[model])
            part.font_path = None  # only its visualiser reads it
            # rapidocr's ORT wrapper takes a ready session (its "session" key) instead of its own options
            part.session = ort.InferenceSession(str(paths[model]), sess_options=options,
                                                providers=["CPUExecutionProvider"])
            return part

        self.detector = TextDetector(section("Det", DET_MODEL))
        self.detector.limit_type = "max"
        self.classifier = TextClassifier(section("Cls", CLS_MODEL))
        self.recognizer = TextRecognizer(section("Rec", REC_MODEL))
        self.threads = threads

    # --- the stages ------------------------------------------------------------------------------
    def detect(self, bgr: np.ndarray | Image.Image, side: int) -> tuple[np.ndarray, int, float]:
        """Boxes (n, 4, 2) in the image's pixels, detected on it reduced to ``side`` px (never enlarged),
        the side used and the probability map's maximum. ``bgr``: a BGR array, or an RGB PIL image (reduced
        before it is converted: a photo without text never becomes a full-size array)."""
        width, height = bgr.size if isinstance(bgr, Image.Image) else (bgr.shape[1], bgr.shape[0])
        ratio = min(1.0, side / max(height, width))
        # multiples of 32 (the network's stride), at least 32
        new_w, new_h = (max(32, round(v * ratio / 32) * 32) for v in (width, height))
        if isinstance(bgr, Image.Image):  # area averaging (BOX), then RGB -> BGR on the small one
            small_rgb = bgr if (new_w, new_h) == (width, height) else bgr.resize((new_w, new_h), Image.Resampling.BOX)
            small = cv2.cvtColor(np.asarray(small_rgb), cv2.COLOR_RGB2BGR)
        else:
            small = bgr if (new_w, new_h) == (width, height) else cv2.resize(
                bgr, (new_w, new_h), interpolation=cv2.INTER_AREA if ratio < 1 else cv2.INTER_LINEAR)
        det = self.detector
        pre = DetPreProcess(max(new_w, new_h), "max", det.mean, det.std)(small)  # normalises; no resize
        probability = det.session(pre)
        peak = float(probability.max())
        found, _scores = det.postprocess_op(probability, (new_h, new_w))
        if len(found) == 0:
            return np.zeros((0, 4, 2), np.float32), max(new_w, new_h), peak
        boxes = np.asarray(det.sorted_boxes(np.asarray(found)), dtype=np.float32)
        boxes[..., 0] *= width / new_w
        boxes[..., 1] *= height / new_h
        return boxes, max(new_w, new_h), peak

    def recognize(self, crops: list[np.ndarray], deadline: float | None) -> list[tuple[str, float]]:
        """(text, score) per crop, in batches of similar aspect ratio; the deadline is checked per batch."""
        from rapidocr.ch_ppocr_rec import TextRecInput

        order = sorted(range(len(crops)), key=lambda i: crops[i].shape[1] / max(1, crops[i].shape[0]))
        out: list[tuple[str, float]] = [("", 0.0)] * len(crops)
        batch = max(1, self.recognizer.rec_batch_num)
        for start in range(0, len(order), batch):
            _check(deadline)
            ids = order[start:start + batch]
            read = self.recognizer(TextRecInput(img=[crops[i] for i in ids]))
            for i, text, score in zip(ids, read.txts or (), read.scores or (), strict=True):
                out[i] = (str(text).strip(), float(score))
        return out

    def upside_down(self, crops: list[np.ndarray]) -> list[bool]:
        """Which crops the direction classifier finds turned by 180 degrees (confidently)."""
        found = self.classifier(crops)
        return [label == "180" and score > self.classifier.cls_thresh for label, score in found.cls_res or ()]

    # --- one read --------------------------------------------------------------------------------
    def read(self, image: Image.Image, policy: StagePolicy, deadline: float | None = None,
             ) -> tuple[list[tuple[str, float, np.ndarray]], StageTimes]:
        """Lines (text, score, box in the pixels of ``image``, RGB) in reading order, and what each stage cost."""
        times = StageTimes()
        t0 = time.perf_counter()
        boxes, side, times.active_peak = self.detect(image, policy.coarse_side)
        times.detect_ms = (time.perf_counter() - t0) * 1000
        times.sides, times.boxes = (side,), len(boxes)
        if len(boxes) and policy.block_edges > 0 and _all_blocks(boxes, image.size) \
                and fine_detail(image) < policy.block_edges:
            boxes = boxes[:0]  # a block without a strong edge in it holds no text
        elif len(boxes) and policy.read_side > times.sides[0]:
            t = time.perf_counter()
            again, side, _ = self.detect(image, min(policy.read_side, max(times.sides[0], _budget_side(image.size, policy))))
            times.detect_ms += (time.perf_counter() - t) * 1000
            if side > times.sides[0] and len(again):
                boxes, times.sides, times.boxes = again, times.sides + (side,), len(again)
        elif not len(boxes) and policy.coarse_side < policy.fine_side and policy.detail_edges > 0:
            t = time.perf_counter()
            if fine_detail(image) >= policy.detail_edges:  # small print the coarse pass cannot see
                boxes, side, _ = self.detect(image, _budget_side(image.size, policy))
                times.sides += (side,)
            elif 0 < policy.small_text_peak <= times.active_peak:  # text-like, too small for a box at coarse
                boxes, side, _ = self.detect(image, min(2 * policy.coarse_side, _budget_side(image.size, policy)))
                times.sides += (side,)
            times.detect_ms += (time.perf_counter() - t) * 1000
            times.boxes = len(boxes)
        if not len(boxes):
            return [], times  # the early exit: no text box, nothing else runs
        bgr = cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2BGR)  # full size: the crops come from it
        _bound(len(boxes), policy)
        read = self._recognize_boxes(bgr, boxes, policy, deadline, times)
        weak = [i for i, (_, score) in enumerate(read) if score < policy.min_score]
        if weak:  # a block read poorly (a label, a page): look closer, there only
            _check(deadline)
            fine = self._fine_pass(bgr, boxes, read, weak, policy, deadline, times)
            if fine is not None:
                boxes, read = fine
        weak = [i for i, (_, score) in enumerate(read) if score < policy.min_score]
        if weak:
            _check(deadline)
            self._second_chance(bgr, boxes, read, weak, deadline, times)
        order = _reading_order(boxes)
        lines = [(read[i][0], read[i][1], boxes[i]) for i in order if read[i][0] and read[i][1] >= policy.min_score]
        return lines, times

    def _recognize_boxes(self, bgr: np.ndarray, boxes: np.ndarray, policy: StagePolicy, deadline: float | None,
                         times: StageTimes) -> list[tuple[str, float]]:
        t = time.perf_counter()
        self.recognizer.rec_batch_num = policy.rec_batch
        read = self.recognize([_crop(bgr, box) for box in boxes], deadline)
        times.recognize_ms += (time.perf_counter() - t) * 1000
        return read

    def _fine_pass(
        self, bgr: np.ndarray, boxes: np.ndarray, read: list[tuple[str, float]], weak: list[int],
        policy: StagePolicy, deadline: float | None, times: StageTimes,
    ) -> tuple[np.ndarray, list[tuple[str, float]]] | None:
        """Detect again, in the region of the weak boxes, at up to ``fine_side``; None if no more detail."""
        height, width = bgr.shape[:2]
        corners = boxes[weak].reshape(-1, 2)
        (x0, y0), (x1, y1) = corners.min(axis=0), corners.max(axis=0)
        pad = max(16.0, 0.05 * max(x1 - x0, y1 - y0))
        x0, y0 = int(max(0, x0 - pad)), int(max(0, y0 - pad))
        x1, y1 = int(min(width, x1 + pad)), int(min(height, y1 + pad))
        region = bgr[y0:y1, x0:x1]
        coarse_px = max(region.shape[:2]) * times.sides[0] / max(height, width)  # the region's size at coarse
        long_side = max(region.shape[:2])
        target = int(min(policy.fine_side, long_side,
                         long_side * (policy.fine_pixels / (region.shape[0] * region.shape[1])) ** 0.5))
        if target < coarse_px * 1.5 or min(region.shape[:2]) < 8:
            return None  # the coarse pass saw it at (nearly) this size already
        t = time.perf_counter()
        found, side, _ = self.detect(region, target)
        times.detect_ms += (time.perf_counter() - t) * 1000
        times.sides += (side,)
        if not len(found):
            return None
        found[..., 0] += x0
        found[..., 1] += y0
        keep = [i for i in range(len(boxes)) if i not in set(weak)]
        if keep:  # boxes already read well stay; fine boxes inside them are the same text again
            centres = found.mean(axis=1)
            inside = np.zeros(len(found), bool)
            for i in keep:
                inside |= _contains(boxes[i], centres)
            found = found[~inside]
        _bound(len(keep) + len(found), policy)
        times.boxes = len(keep) + len(found)
        fine_read = self._recognize_boxes(bgr, found, policy, deadline, times) if len(found) else []
        merged = np.concatenate([boxes[keep], found]) if keep else found
        return merged, [read[i] for i in keep] + fine_read

    def _second_chance(self, bgr: np.ndarray, boxes: np.ndarray, read: list[tuple[str, float]], weak: list[int],
                       deadline: float | None, times: StageTimes) -> None:
        """The direction classifier on the weak lines; one it finds upside down is turned and read again."""
        t = time.perf_counter()
        crops = [_crop(bgr, boxes[i]) for i in weak]
        turned = [(i, crop) for i, crop, flip in zip(weak, crops, self.upside_down(crops), strict=True) if flip]
        if turned:
            again = self.recognize([cv2.rotate(crop, cv2.ROTATE_180) for _, crop in turned], deadline)
            for (i, _), second in zip(turned, again, strict=True):
                if second[1] > read[i][1]:
                    read[i] = second
        times.classify_ms += (time.perf_counter() - t) * 1000


def fine_detail(image: Image.Image, side: int = 320, step: int = 48) -> float:
    """The fraction of pixels, on ``image`` reduced to ``side`` px, whose neighbour differs by over ``step``
    grey levels: ~0.01-0.15 for a printed page, ~0 for smooth photos (sensor grain averages out)."""
    width, height = image.size
    ratio = min(1.0, side / max(width, height))
    size = (max(2, round(width * ratio)), max(2, round(height * ratio)))
    small = image if size == (width, height) else image.resize(size, Image.Resampling.BOX)
    grey = np.asarray(small.convert("L"), dtype=np.int16)
    across = np.abs(np.diff(grey, axis=1)) > step
    down = np.abs(np.diff(grey, axis=0)) > step
    return float(max(across.mean(), down.mean()))


def _all_blocks(boxes: np.ndarray, size: tuple[int, int], share: float = 0.75) -> bool:
    """Whether every box spans over ``share`` of the image's width and of its height (no text line does)."""
    spans = boxes.max(axis=1) - boxes.min(axis=1)  # (n, 2): width, height of each box
    return bool(((spans[:, 0] > share * size[0]) & (spans[:, 1] > share * size[1])).all())


def _budget_side(size: tuple[int, int], policy: StagePolicy) -> int:
    """The longest side a detection of the whole image may use within ``fine_side`` and ``fine_pixels``."""
    long_side, short_side = max(size), max(1, min(size))
    return int(min(policy.fine_side, long_side, (policy.fine_pixels * long_side / short_side) ** 0.5))


def _crop(bgr: np.ndarray, box: np.ndarray) -> np.ndarray:
    from rapidocr.utils.process_img import get_rotate_crop_image

    return get_rotate_crop_image(bgr, box.astype(np.float32).copy())


def _contains(box: np.ndarray, points: np.ndarray) -> np.ndarray:
    contour = box.astype(np.float32).reshape(-1, 1, 2)
    return np.array([cv2.pointPolygonTest(contour, (float(x), float(y)), False) >= 0 for x, y in points], bool)


def _reading_order(boxes: np.ndarray, line_px: float = 10.0) -> list[int]:
    """Top to bottom, then left to right within a line (rapidocr's ``sorted_boxes``, as indices)."""
    if not len(boxes):
        return []
    by_y = np.argsort(boxes[:, 0, 1], kind="stable")
    lines = np.concatenate([[0], np.cumsum(np.diff(boxes[by_y, 0, 1]) >= line_px)])
    return [int(by_y[i]) for i in np.lexsort((boxes[by_y, 0, 0], lines))]


def _bound(count: int, policy: StagePolicy) -> None:
    if count > policy.max_boxes:
        raise UnprocessableInput(f"detection found {count} text boxes, more than the {policy.max_boxes} "
                           "one read may recognise", param="image", code="ocr_too_many_boxes")


def _check(deadline: float | None) -> None:
    if deadline is not None and time.perf_counter() > deadline:
        raise ModelUnavailable("OCR ran past its deadline", code="ocr_timeout", retry_after=1.0)


__all__ = ["OcrStages", "StagePolicy", "StageTimes", "fine_detail", "models_dir", "session_options"]
