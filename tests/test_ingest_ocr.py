"""OCR at ingestion with the real rapidocr model: photos and scanned PDF pages get their text read,
stored in the payload (with line boxes), fed to BM25; a failing OCR never loses the snippet."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from retriever.errors import UpstreamError
from retriever.ingest.readers import read_paths
from retriever.ocr import OcrEngine
from retriever.plan import RetrievalPlan
from server.settings import Settings
from server.wiring import build_knowledge_base
from tests.support.media import encode_image, pdf_bytes, text_pdf
from tests.test_ocr import font


def panel(text: str, size: tuple[int, int] = (640, 220)) -> Image.Image:
    image = Image.new("RGB", size, (15, 20, 25))
    ImageDraw.Draw(image).text((36, 70), text, font=font(60), fill=(255, 190, 60))
    return image


@pytest.fixture(scope="module")
def engine() -> OcrEngine:
    ocr = OcrEngine()
    yield ocr
    ocr.close()


async def test_photos_and_scanned_pages_are_read_and_searchable(settings: Settings, embedder, engine: OcrEngine,
                                                                tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "display.jpg").write_bytes(encode_image(panel("ERROR E-417"), "JPEG"))
    (docs / "scan.pdf").write_bytes(pdf_bytes([panel("PART P-220-C", (800, 400)).convert("RGB")]))
    (docs / "typed.pdf").write_bytes(text_pdf(["Firmware v2.3.1 notes"]))
    kb = await build_knowledge_base(settings.model_copy(update={"ocr_enabled": True}), embedder=embedder,
                                    ocr=engine)
    try:
        report = await kb.ingest(read_paths([str(docs)]))
        assert report.ingested == 3 and report.ocr_failed == 0 and report.timings["ocr"] > 0
        points = {p.payload.source.rsplit("/", 1)[-1]: p.payload for p in (await kb.list_snippets(10))[0]}
        photo = points["display.jpg"]
        assert "E-417" in photo.ocr_text and photo.ocr_lines
        assert {"text", "score", "box"} <= set(photo.ocr_lines[0]) and len(photo.ocr_lines[0]["box"]) == 4
        scanned = next(p for name, p in points.items() if name.startswith("scan.pdf"))
        assert "P-220-C" in scanned.ocr_text  # a page without a text layer is read
        typed = next(p for name, p in points.items() if name.startswith("typed.pdf"))
        assert typed.ocr_text == "" and "v2.3.1" in typed.text  # a text layer needs no OCR
        for query, expected in (("E-417", photo), ("P-220-C", scanned), ("e417", photo)):
            found = await kb.search(query, plan=RetrievalPlan(pool=3, mode="lexical"))
            assert found.candidates[0].payload.content_hash == expected.content_hash, query
    finally:
        await kb.close()


async def test_a_failing_ocr_costs_the_text_not_the_snippet(settings: Settings, embedder, tmp_path: Path) -> None:
    class Broken:
        def read(self, image: Image.Image, timeout_s: float | None = None):  # type: ignore[no-untyped-def]
            raise UpstreamError("the OCR engine crashed", code="ocr_failed")

    (tmp_path / "d.png").write_bytes(encode_image(panel("ERROR E-9"), "PNG"))
    kb = await build_knowledge_base(settings.model_copy(update={"ocr_enabled": True}), embedder=embedder,
                                    ocr=Broken())  # type: ignore[arg-type]
    try:
        report = await kb.ingest(read_paths([str(tmp_path / "d.png")]))
        assert report.ingested == 1 and report.ocr_failed == 1 and report.failed == 0
        (point,), _ = await kb.list_snippets(5)
        assert point.payload.ocr_text == "" and point.payload.image_ref
    finally:
        await kb.close()
