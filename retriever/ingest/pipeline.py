"""Ingestion pipeline: read → identify → skip existing → decode/preprocess → embed → blobs → upsert.

Stages overlap: a producer task prepares the next chunks in a thread pool (reading bytes, hashing,
decoding, thumbnails, CLIP preprocessing) while one encoder thread runs the model on the current
chunk, and the previous chunk's blobs and points are written meanwhile. Preprocessing happens in
the pool, so the encoder thread only ever runs the model. OCR runs beside the encoder, not in
front of it: a chunk goes to the encoder as soon as it is decoded, its images are read (one OCR
thread) while it and the next chunk encode, and its points wait for both.

What an item must hold, what identifies it (a deterministic point id, so re-ingestion is a no-op
and a killed run re-run resumes with no duplicate) and how its image is checked are the ingestion
rules of ``retriever/ingest/rules.py``. An item whose id is already stored (or seen earlier in the
run) is skipped (``skipped_existing``) before it is even decoded.

Crash safety: a chunk's blobs (original + thumbnail) are written (atomically, fsync'd) before its
points are upserted, so a point never exists without its image.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from retriever.blobs import BlobStore
from retriever.embedder import ClipEmbedder
from retriever.errors import InvalidInput, UnprocessableInput, VlmragError
from retriever.images import THUMBNAIL_SUFFIX, make_thumbnail
from retriever.ingest.readers import IngestItem
from retriever.ingest.rules import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    IngestRules,
    clean_tags,
    has_text,
    passage_text,
    snippet_kind,
    snippet_tags,
)
from retriever.lexical import snippet_lexical
from retriever.store.base import VectorStore
from retriever.types import PassageSpec, PointRecord, SnippetPayload, VectorValue

if TYPE_CHECKING:
    from retriever.ocr import OcrResult
    from retriever.text_embedder import TextEmbedder

log = logging.getLogger(__name__)

ProgressFn = Callable[["IngestReport"], None]
OcrReader = Callable[..., "OcrResult"]  # retriever.ocr.OcrEngine.read (image, page=bool), with its timeout


@dataclass(slots=True)
class IngestFailure:
    """One item that was not ingested, and why."""

    source: str
    key: str
    reason: str
    status: int | None = None  # 413/415/422... for input errors, None for reader-level failures


@dataclass(slots=True)
class IngestReport:
    """Counts, failures and per-stage timings (seconds; worker stages are summed over threads)."""

    seen: int = 0
    ingested: int = 0
    skipped_existing: int = 0
    failed: int = 0
    failures: list[IngestFailure] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    first_batch_s: float | None = None  # run start → first chunk embedded
    ids: list[str] = field(default_factory=list)  # ids of the points created by this run
    total: int | None = None  # items expected, when the caller knows
    ocr_failed: int = 0  # snippets stored without the text of their image (OCR failed or timed out)

    @property
    def done(self) -> int:
        """Items finished either way (stored, already present or failed): what a progress bar counts."""
        return self.ingested + self.skipped_existing + self.failed

    def add_time(self, stage: str, seconds: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + seconds

    def fail(self, item: IngestItem, reason: str, status: int | None = None) -> None:
        self.failed += 1
        prefix = f"{item.image_name}: "
        if item.image_name and reason.startswith(prefix):  # the failure already names the item
            reason = reason[len(prefix):]
        self.failures.append(IngestFailure(item.source, item.key, reason, status))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("ids")
        return data


@dataclass(slots=True)
class _Prepared:
    """An item on its way through the stages."""

    item: IngestItem
    text: str
    content_hash: str = ""
    point_id: str = ""
    image_bytes: bytes | None = None
    suffix: str = ""
    tensor: torch.Tensor | None = None
    thumbnail: bytes | None = None
    image_info: dict[str, Any] = field(default_factory=dict)
    vectors: dict[str, VectorValue] = field(default_factory=dict)
    ocr_text: str = ""
    ocr_lines: list[dict[str, Any]] = field(default_factory=list)
    ocr_s: float = 0.0
    ocr_failed: bool = False
    ocr_image: Image.Image | None = None  # waiting to be read (beside the encoder)


class IngestPipeline:
    """Turns ``IngestItem``s into stored snippets; shared by the CLI and ``POST /v1/snippets``."""

    def __init__(
        self, embedder: ClipEmbedder, store: VectorStore, blobs: BlobStore, *, batch_size: int = 16,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        thumbnail_size: int = 256, draft_size: int | None = 512, workers: int | None = None,
        prefetch_batches: int = 2, id_namespace: str = "", ocr: OcrReader | None = None,
        text_embedder: TextEmbedder | None = None, passage_ocr: bool = False,
    ) -> None:
        self.embedder = embedder
        #: fills the ``passage`` vector (where the collection has it) from the text and, with
        #: ``passage_ocr``, a photo's OCR text (a page's always); runs in the writer, beside the next chunk's CLIP encode
        self.text_embedder = text_embedder
        self.passage_ocr = passage_ocr
        self._passage_ready: bool | None = None
        self._passage_layout: PassageSpec | None = None  # the store's ``passage`` spec: one vector or sections
        self.store = store
        self.blobs = blobs
        self.batch_size = max(1, batch_size)
        # draft_size: JPEGs are decoded at a reduced DCT scale whose short side stays >= it; CLIP sees
        # 224 px and thumbnails 256 px, so a 12 Mpx photo needs no full decode.
        self.rules = IngestRules(max_image_bytes=max_image_bytes, max_image_pixels=max_image_pixels,
                                 draft_size=draft_size, id_namespace=id_namespace)
        self.thumbnail_size = thumbnail_size
        self.ocr = ocr  # reads the text in each image (and scanned page); None: no OCR
        self.workers = workers or max(2, os.cpu_count() or 2)
        self.prefetch_batches = max(1, prefetch_batches)

    # --- per-item work (worker threads) ----------------------------------------------------------
    def _identify(self, item: IngestItem) -> _Prepared:
        """Check and read the item, compute content hash and point id (no decoding yet)."""
        found = self.rules.identify(item)
        return _Prepared(item=item, text=found.text, content_hash=found.content_hash,
                         point_id=found.point_id, image_bytes=found.image_bytes)

    def _decode(self, prepared: _Prepared) -> _Prepared:
        """Validate + decode the image, make its thumbnail and its CLIP input tensor."""
        if prepared.image_bytes is None:
            return prepared
        item = prepared.item
        decoded = self.rules.decode(prepared.image_bytes, item.image_name or item.source)
        prepared.suffix = decoded.suffix
        prepared.image_info = {"format": decoded.format, "media_type": decoded.media_type,
                               "width": decoded.width, "height": decoded.height,
                               "bytes": len(prepared.image_bytes)}
        # Tagged with the content hash: thumbnails of distinct originals never share a blob.
        prepared.thumbnail = make_thumbnail(decoded.image, self.thumbnail_size,
                                            comment=prepared.content_hash)
        prepared.tensor = self.embedder.preprocess(decoded.image)
        if self.ocr is not None and not (item.kind == "page" and has_text(prepared.text)):
            prepared.ocr_image = decoded.image  # a page with a text layer has its text already
        return prepared

    def _read_text(self, prepared: _Prepared) -> None:
        """OCR of one decoded image: a failure costs the text read, never the snippet."""
        image, prepared.ocr_image = prepared.ocr_image, None
        if self.ocr is None or image is None:
            return
        t0 = time.perf_counter()
        try:
            result = self.ocr(image, page=prepared.item.kind == "page")
            prepared.ocr_text, prepared.ocr_lines = result.text, result.lines_payload()
        except VlmragError as exc:
            log.warning("OCR of %s failed, ingested without its text: %s", prepared.item.key, exc.message)
            prepared.ocr_failed = True
        except Exception as exc:  # noqa: BLE001 - OCR must never fail the snippet
            log.warning("OCR of %s failed, ingested without its text: %s: %s", prepared.item.key,
                        type(exc).__name__, exc)
            prepared.ocr_failed = True
        prepared.ocr_s = time.perf_counter() - t0

    def _read_texts(self, batch: list[_Prepared]) -> None:
        """OCR of a chunk, one image after the other (the engine has one worker: more threads only queue)."""
        for prepared in batch:
            self._read_text(prepared)

    def _encode(self, batch: list[_Prepared]) -> None:
        """Run the model on one chunk (the single encoder thread)."""
        with_image = [p for p in batch if p.tensor is not None]
        if with_image:
            tensors = [p.tensor for p in with_image if p.tensor is not None]
            vectors = self.embedder.embed_preprocessed(torch.stack(tensors))
            for p, vec in zip(with_image, vectors):
                p.vectors["image"] = _as_list(vec)
                p.tensor = None  # free the tensor early
        with_text = [p for p in batch if has_text(p.text)]
        if with_text:
            vectors = self.embedder.embed_texts([p.text for p in with_text])
            for p, vec in zip(with_text, vectors):
                p.vectors["text"] = _as_list(vec)

    def _encode_passages(self, batch: list[_Prepared]) -> None:
        """The ``passage`` vectors of a chunk (after its OCR); an empty text gets none."""
        if self.text_embedder is None:
            return
        spec = self._passage_layout or self.text_embedder.spec
        texts = [passage_text(p.text, p.ocr_text, self.passage_ocr, p.item.kind or "") for p in batch]
        for p, vec in zip(batch, self.text_embedder.embed_for(spec, texts)):
            if vec is not None:
                p.vectors["passage"] = vec

    async def _passages_wanted(self) -> bool:
        """Whether this store takes ``passage`` vectors from this embedder, in which layout (checked once)."""
        if self.text_embedder is None:
            return False
        if self._passage_ready is None:
            spec = await self.store.passage_spec()
            self._passage_ready = spec is not None and spec.same_embedder(self.text_embedder.spec)
            self._passage_layout = spec if self._passage_ready else None
        return self._passage_ready

    def _write_blobs(self, prepared: _Prepared) -> tuple[str, str] | None:
        if prepared.image_bytes is None:
            return None
        image_ref = self.blobs.put(prepared.image_bytes, prepared.suffix)
        thumb_ref = self.blobs.put(prepared.thumbnail or b"", THUMBNAIL_SUFFIX)
        return image_ref, thumb_ref

    def _point(self, prepared: _Prepared, refs: tuple[str, str] | None, tags: list[str]) -> PointRecord:
        item = prepared.item
        kind = snippet_kind(item.kind, has_image=prepared.image_bytes is not None, text=prepared.text)
        extra = dict(item.extra)
        if prepared.image_info:
            extra["image"] = prepared.image_info
        payload = SnippetPayload(
            kind=kind, text=prepared.text, source=item.source,
            tags=snippet_tags(item.tags, tags), content_hash=prepared.content_hash,
            image_ref=refs[0] if refs else None, thumb_ref=refs[1] if refs else None, page=item.page,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"), extra=extra,
            ocr_text=prepared.ocr_text, ocr_lines=prepared.ocr_lines,
        )
        return PointRecord(id=prepared.point_id, vectors=prepared.vectors, payload=payload,
                           lexical=snippet_lexical(payload))

    # --- batch run ---------------------------------------------------------------------------------
    async def run(
        self, items: Iterable[IngestItem], tags: Iterable[str] = (), progress: ProgressFn | None = None,
        total: int | None = None,
    ) -> IngestReport:
        """Ingest every item; bad items are reported in the result, never raised.

        Store failures (unreachable, locked) do raise: nothing sensible can continue without it.
        """
        report = IngestReport(total=total if total is not None else _len_or_none(items))
        run_tags = clean_tags(tags)
        started = time.perf_counter()
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="vlmrag-ingest")
        encoder = ThreadPoolExecutor(1, thread_name_prefix="vlmrag-encode")
        # Unbounded queue + semaphore: back-pressure on chunks, while the end marker never blocks.
        queue: asyncio.Queue[list[_Prepared] | None] = asyncio.Queue()
        slots = asyncio.Semaphore(self.prefetch_batches)
        producer = asyncio.create_task(self._produce(iter(items), report, pool, queue, slots))
        writer: asyncio.Task[None] | None = None
        loop = asyncio.get_running_loop()
        try:
            while (batch := await queue.get()) is not None:
                slots.release()
                # OCR of this chunk starts now and runs while it (and the next chunk) encode
                reading = asyncio.ensure_future(asyncio.to_thread(self._read_texts, batch)) \
                    if any(p.ocr_image is not None for p in batch) else None
                t0 = time.perf_counter()
                try:
                    await loop.run_in_executor(encoder, self._encode, batch)
                except Exception as exc:  # a model error fails this chunk, not the run
                    log.exception("embedding failed for a chunk of %d items", len(batch))
                    for p in batch:
                        report.fail(p.item, f"embedding failed: {exc}")
                    batch = []
                report.add_time("encode", time.perf_counter() - t0)
                if report.first_batch_s is None:
                    report.first_batch_s = time.perf_counter() - started
                if writer is not None:
                    await writer  # at most one chunk being written while the next one encodes
                writer = asyncio.create_task(self._write(batch, run_tags, report, progress, reading))
            if writer is not None:
                await writer
            await producer  # re-raises a producer failure (e.g. store unavailable)
        finally:
            for task in (producer, writer):
                if task is not None and not task.done():
                    task.cancel()
            pool.shutdown(wait=False, cancel_futures=True)
            encoder.shutdown(wait=False, cancel_futures=True)
            report.timings["total"] = time.perf_counter() - started
        return report

    async def _produce(
        self, items: Iterator[IngestItem], report: IngestReport, pool: ThreadPoolExecutor,
        queue: asyncio.Queue[list[_Prepared] | None], slots: asyncio.Semaphore,
    ) -> None:
        """Chunks of prepared (identified, new, decoded) items → queue; None at the end."""
        loop = asyncio.get_running_loop()
        seen_ids: set[str] = set()
        try:
            while True:
                await slots.acquire()
                t0 = time.perf_counter()
                chunk = await asyncio.to_thread(_take, items, self.batch_size)
                report.add_time("read", time.perf_counter() - t0)
                if not chunk:
                    break
                report.seen += len(chunk)
                t0 = time.perf_counter()
                identified = await asyncio.gather(
                    *(loop.run_in_executor(pool, _attempt, self._identify, item) for item in chunk)
                )
                report.add_time("identify", time.perf_counter() - t0)
                fresh: list[_Prepared] = []
                for item, result in zip(chunk, identified):
                    if isinstance(result, VlmragError):
                        report.fail(item, result.message, result.status_code)
                    elif result.point_id in seen_ids:
                        report.skipped_existing += 1  # the same material twice in one run
                    else:
                        seen_ids.add(result.point_id)
                        fresh.append(result)
                existing = await self.store.existing_ids([p.point_id for p in fresh]) if fresh else set()
                report.skipped_existing += sum(p.point_id in existing for p in fresh)
                fresh = [p for p in fresh if p.point_id not in existing]
                t0 = time.perf_counter()
                decoded = await asyncio.gather(
                    *(loop.run_in_executor(pool, _attempt, self._decode, p) for p in fresh)
                )
                report.add_time("decode", time.perf_counter() - t0)
                ready = []
                for p, result in zip(fresh, decoded):
                    if isinstance(result, VlmragError):
                        report.fail(p.item, result.message, result.status_code)
                    else:
                        ready.append(result)
                await queue.put(ready)
        finally:
            queue.put_nowait(None)  # always unblock the consumer, also on failure or cancellation

    async def _write(
        self, batch: list[_Prepared], tags: list[str], report: IngestReport, progress: ProgressFn | None,
        reading: asyncio.Future[None] | None = None,
    ) -> None:
        """Blobs first (in a thread), then the points of the chunk in one upsert (once its OCR is done)."""
        if reading is not None:
            t = time.perf_counter()
            await reading
            report.add_time("ocr_wait", time.perf_counter() - t)  # the writer waiting on OCR, not the encoder
            for p in batch:
                report.add_time("ocr", p.ocr_s)  # OCR thread time
                report.ocr_failed += p.ocr_failed
        if batch and await self._passages_wanted():
            t = time.perf_counter()
            try:
                await asyncio.to_thread(self._encode_passages, batch)
            except Exception as exc:  # a model error fails this chunk, not the run
                log.exception("passage embedding failed for a chunk of %d items", len(batch))
                for p in batch:
                    report.fail(p.item, f"passage embedding failed: {exc}")
                batch = []
            report.add_time("passage", time.perf_counter() - t)
        t0 = time.perf_counter()
        # Concurrent writes: each blob waits on its own fsync, so a chunk costs ~one fsync round.
        written = await asyncio.gather(
            *(asyncio.to_thread(self._write_blobs, p) for p in batch), return_exceptions=True
        )
        points = []
        for p, refs in zip(batch, written):
            if isinstance(refs, (OSError, VlmragError)):
                report.fail(p.item, f"cannot store image: {refs}")
            elif isinstance(refs, BaseException):
                raise refs
            else:
                points.append(self._point(p, refs, tags))
        t1 = time.perf_counter()
        report.add_time("blobs", t1 - t0)
        if points:
            await self.store.upsert(points)
        report.add_time("upsert", time.perf_counter() - t1)
        report.ingested += len(points)
        report.ids.extend(point.id for point in points)
        if progress is not None:
            progress(report)

    # --- one snippet (API) ---------------------------------------------------------------------
    async def add_snippet(
        self, image_bytes: bytes | None, text: str | None, source: str = "", tags: Iterable[str] = (),
        filename: str | None = None, *, page: int | None = None, extra: dict[str, Any] | None = None,
    ) -> tuple[str, bool]:
        """Store one snippet; returns (id, created). Lands whole (blobs, then point) or raises."""
        text = (text or "").strip()
        if image_bytes is None and not text:
            raise InvalidInput("a snippet needs an image, text, or both", param="image")
        item = IngestItem(
            source=source or filename or "", key=filename or source or "snippet", text=text,
            image_bytes=image_bytes, image_name=filename, page=page, extra=dict(extra or {}),
        )
        prepared = await asyncio.to_thread(self._identify, item)
        if await self.store.existing_ids([prepared.point_id]):
            return prepared.point_id, False
        prepared = await asyncio.to_thread(self._decode, prepared)
        await asyncio.gather(asyncio.to_thread(self._encode, [prepared]), asyncio.to_thread(self._read_text, prepared))
        if await self._passages_wanted():
            await asyncio.to_thread(self._encode_passages, [prepared])
        refs = await asyncio.to_thread(self._write_blobs, prepared)
        await self.store.upsert([self._point(prepared, refs, clean_tags(tags))])
        return prepared.point_id, True


def _attempt(fn: Callable[[Any], _Prepared], arg: Any) -> _Prepared | VlmragError:
    """Run one per-item step; an input error becomes a value (reported), not an exception."""
    try:
        return fn(arg)
    except VlmragError as exc:
        return exc
    except Exception as exc:  # an unexpected decoder/reader failure must not stop the run
        log.exception("ingest: unexpected error")
        return UnprocessableInput(f"unexpected error: {type(exc).__name__}: {exc}")


def _take(items: Iterator[IngestItem], n: int) -> list[IngestItem]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= n:
            break
    return chunk


def _len_or_none(items: Iterable[IngestItem]) -> int | None:
    try:
        return len(items)  # type: ignore[arg-type]
    except TypeError:
        return None


def _as_list(vector: np.ndarray) -> list[float]:
    return vector.astype(np.float32, copy=False).tolist()
