"""Ingestion end to end with the tiny CLIP and both store adapters: readers, pipeline, knowledge base."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retriever.blobs import LocalBlobStore
from retriever.errors import InvalidInput, NotFound, UnprocessableInput
from retriever.ingest import IngestPipeline, read_folder, read_jsonl, read_paths, split_passages
from retriever.ingest.readers import IngestItem, read_coco, read_pdf
from retriever.ingest.rules import IngestRules, content_hash_of, point_id_for
from retriever.knowledge_base import KnowledgeBase
from retriever.plan import RetrievalPlan
from retriever.types import SearchFilters, StoredPoint
from tests.support.bad_images import OK, write_bad_images
from tests.support.media import png_bytes, text_pdf

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
async def kb(store, embedder, tmp_path: Path) -> KnowledgeBase:
    blobs = LocalBlobStore(tmp_path / "blobs")
    pipeline = IngestPipeline(embedder, store, blobs, batch_size=4, workers=2)
    return KnowledgeBase(embedder, store, blobs, pipeline=pipeline, collection="vlmrag-test")


def save_images(folder: Path, images: list[Image.Image], prefix: str = "img") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = folder / f"{prefix}{i}.png"
        image.save(path)
        paths.append(path)
    return paths


async def all_points(kb: KnowledgeBase) -> list[StoredPoint]:
    points, offset = [], None
    while True:
        page, offset = await kb.store.scroll(100, offset)
        points.extend(page)
        if offset is None or not page:
            return points


# --- retrieval properties that hold for any weights -------------------------------------------------


async def test_ingested_image_is_its_own_top1(kb: KnowledgeBase, sample_images, tmp_path: Path) -> None:
    save_images(tmp_path / "photos", sample_images)
    report = await kb.ingest(read_folder(tmp_path / "photos"))
    assert (report.ingested, report.failed, report.seen) == (len(sample_images), 0, len(sample_images))
    for i, image in enumerate(sample_images):
        result = await kb.search(images=[image], plan=RetrievalPlan(pool=3, filters=SearchFilters(kind=["image"])))
        top = result.candidates[0]
        assert top.payload.source == f"photos/img{i}.png"
        assert top.vector_scores["image->image"] == pytest.approx(1.0, abs=1e-3)


async def test_exact_caption_finds_its_snippet(kb: KnowledgeBase, sample_images, tmp_path: Path) -> None:
    folder = tmp_path / "captioned"
    captions = ["a red bicycle leaning on a wall", "two dogs playing in the snow", "a bowl of ramen",
                "the control panel of a pump", "a lighthouse at dusk", "circuit board close-up"]
    for path, caption in zip(save_images(folder, sample_images), captions):
        path.with_suffix(".txt").write_text(caption)
    await kb.ingest(read_folder(folder))
    for caption, i in zip(captions, range(len(captions))):
        result = await kb.search(caption, plan=RetrievalPlan(pool=6))
        by_source = {c.payload.source: c for c in result.candidates}
        mine = by_source[f"captioned/img{i}.png"]
        assert mine.payload.text == caption and mine.payload.kind == "image_text"
        assert mine.vector_scores["text->text"] == pytest.approx(1.0, abs=1e-3)
        assert max(c.vector_scores.get("text->text", -1) for c in result.candidates) == \
            mine.vector_scores["text->text"]


async def test_reingest_changes_nothing(kb: KnowledgeBase, sample_images, tmp_path: Path) -> None:
    save_images(tmp_path / "p", sample_images)
    (tmp_path / "p" / "notes.md").write_text("# Pumps\nPrime the pump before starting.\n")
    first = await kb.ingest(read_folder(tmp_path / "p"), tags=["a"])
    count = await kb.store.count()
    blobs_before = sorted(p.name for p in kb.blobs.root.rglob("*") if p.is_file())
    second = await kb.ingest(read_folder(tmp_path / "p"), tags=["b"])
    assert first.ingested == count == len(sample_images) + 1
    assert (second.ingested, second.skipped_existing, second.failed) == (0, count, 0)
    assert await kb.store.count() == count
    assert sorted(p.name for p in kb.blobs.root.rglob("*") if p.is_file()) == blobs_before


async def test_duplicates_within_one_run_land_once(kb: KnowledgeBase, sample_images, tmp_path: Path) -> None:
    paths = save_images(tmp_path / "d", sample_images[:2])
    items = list(read_paths([paths[0], paths[0], paths[1]]))
    report = await kb.ingest(items)
    assert (report.ingested, report.skipped_existing) == (2, 1)


async def test_bad_files_are_reported_and_good_ones_land(kb: KnowledgeBase, tmp_path: Path) -> None:
    corpus = write_bad_images(tmp_path / "mixed")
    report = await kb.ingest(read_folder(tmp_path / "mixed"))
    good = {name for name, (_, status) in corpus.items() if status == OK}
    bad = {name: status for name, (_, status) in corpus.items() if status != OK}
    assert report.ingested == len(good) == await kb.store.count()
    assert report.failed == len(bad)
    failures = {Path(f.source).name: f for f in report.failures}
    assert set(failures) == set(bad)
    for name, status in bad.items():
        assert failures[name].status == status and failures[name].reason
    sources = {p.payload.source for p in await all_points(kb)}
    assert sources == {f"mixed/{name}" for name in good}


async def test_blobs_and_payload(kb: KnowledgeBase, sample_images, tmp_path: Path) -> None:
    (path,) = save_images(tmp_path / "one", sample_images[:1])
    report = await kb.ingest(read_paths([path]), tags=["manual", " "])
    point = await kb.get(report.ids[0])
    assert point.payload.kind == "image" and point.payload.tags == ["manual"]
    assert point.payload.extra["image"]["format"] == "PNG"
    data, media_type = await kb.image_bytes(point.id)
    assert data == path.read_bytes() and media_type == "image/png"
    thumb, thumb_type = await kb.image_bytes(point.id, thumbnail=True)
    assert thumb_type == "image/jpeg" and thumb[:3] == b"\xff\xd8\xff"


# --- readers -----------------------------------------------------------------------------------------


async def test_folder_sidecars(kb: KnowledgeBase, sample_images, tmp_path: Path) -> None:
    folder = tmp_path / "side"
    paths = save_images(folder, sample_images[:4])
    paths[0].with_suffix(".txt").write_text("caption from txt\n")
    paths[1].with_suffix(".md").write_text("caption from **md**")
    paths[2].with_suffix(".json").write_text(json.dumps(
        {"caption": "caption from json", "tags": ["x", "y"], "source": "catalog#42", "license": "cc-by"}))
    (folder / "sub").mkdir()
    (folder / "sub" / "doc.txt").write_text("A plain text document.\n\nSecond paragraph.")
    (folder / ".hidden.png").write_bytes(b"ignored")
    report = await kb.ingest(read_folder(folder))
    assert (report.ingested, report.failed) == (5, 0)
    points = {p.payload.source: p.payload for p in await all_points(kb)}
    assert points["side/img0.png"].text == "caption from txt"
    assert points["side/img1.png"].text == "caption from **md**"
    assert points["catalog#42"].tags == ["x", "y"] and points["catalog#42"].extra["license"] == "cc-by"
    assert points["side/img3.png"].kind == "image"
    assert points["side/sub/doc.txt"].kind == "text"


def test_markdown_passages() -> None:
    body = " ".join(f"word{i}" for i in range(400))  # ~3,000 chars
    text = f"Intro line.\n\n# Install\nStep one.\n\n## Wiring\n{body}\n\n# Empty\n"
    passages = split_passages(text, max_chars=1000)
    assert passages[0] == "Intro line."
    assert passages[1] == "# Install\nStep one."
    wiring = [p for p in passages if p.startswith("## Wiring")]
    assert len(wiring) >= 3 and all(len(p) <= 1000 for p in passages)
    words = " ".join(p.removeprefix("## Wiring\n") for p in wiring).split()
    assert words == body.split()  # nothing lost, no word cut in two
    assert not any(p.startswith("# Empty") for p in passages)


async def test_markdown_file_ingested_as_passages(kb: KnowledgeBase, tmp_path: Path) -> None:
    md = tmp_path / "guide.md"
    md.write_text("# Start\nPress the green button.\n\n# Stop\nPress the red button.\n")
    report = await kb.ingest(read_paths([md]))
    assert report.ingested == 2
    result = await kb.search("# Stop\nPress the red button.", plan=RetrievalPlan(pool=2))
    assert result.candidates[0].payload.text == "# Stop\nPress the red button."


async def test_jsonl_manifest(kb: KnowledgeBase, sample_images, tmp_path: Path) -> None:
    save_images(tmp_path / "imgs", sample_images[:2])
    lines = [
        {"image": "imgs/img0.png", "text": "first", "tags": ["t"], "sku": "A-1"},
        {"text": "text only line"},
        "this is not json",
        {"image": "imgs/missing.png", "text": "x"},
        {"image": "imgs/img1.png", "source": "shop/item-2", "page": 3},
        {"tags": ["nothing else"]},
    ]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n\n")
    report = await kb.ingest(read_jsonl(manifest))
    assert (report.ingested, report.failed) == (3, 3)
    assert sorted(f.key for f in report.failures) == ["manifest.jsonl#L3", "manifest.jsonl#L4", "manifest.jsonl#L6"]
    points = {p.payload.source: p.payload for p in await all_points(kb)}
    assert points["imgs/img0.png"].extra["sku"] == "A-1" and points["imgs/img0.png"].kind == "image_text"
    assert points["manifest.jsonl#L2"].kind == "text"
    assert points["shop/item-2"].page == 3


async def test_coco_captions(kb: KnowledgeBase, sample_images, tmp_path: Path) -> None:
    images_dir = tmp_path / "coco" / "val2017"
    save_images(images_dir, sample_images[:3], prefix="0000")
    annotations = {
        "images": [{"id": 10 + i, "file_name": f"0000{i}.png"} for i in range(3)]
        + [{"id": 99, "file_name": "absent.png"}],
        "annotations": [
            {"image_id": 10, "caption": "a first caption"}, {"image_id": 10, "caption": "another one"},
            {"image_id": 11, "caption": "only caption"},
        ],
    }
    ann_path = tmp_path / "coco" / "annotations" / "captions_val2017.json"
    ann_path.parent.mkdir(parents=True)
    ann_path.write_text(json.dumps(annotations))
    items = list(read_paths([ann_path]))  # detected as COCO, images folder found by name
    assert len(items) == 4
    report = await kb.ingest(items)
    assert (report.ingested, report.failed) == (3, 1)
    by_id = {p.payload.extra["coco_image_id"]: p.payload for p in await all_points(kb)}
    assert by_id[10].text == "a first caption" and by_id[10].extra["captions"] == ["a first caption", "another one"]
    assert by_id[11].kind == "image_text" and by_id[12].kind == "image" and by_id[12].extra["captions"] == []
    assert len(list(read_coco(ann_path, images_dir))) == 4


async def test_pdf_pages(kb: KnowledgeBase, tmp_path: Path) -> None:
    pdf = tmp_path / "manual.pdf"
    pdf.write_bytes(text_pdf(["Pump manual page one", "Safety warnings page two"]))
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.4\nthis is not a pdf at all")
    report = await kb.ingest(read_paths([pdf, broken]))
    assert (report.ingested, report.failed) == (2, 1)
    assert report.failures[0].source == "broken.pdf" and "unreadable PDF" in report.failures[0].reason
    pages = sorted((p.payload for p in await all_points(kb)), key=lambda p: p.page or 0)
    assert [(p.kind, p.page, p.source) for p in pages] == [("page", 1, "manual.pdf"), ("page", 2, "manual.pdf")]
    assert "Pump manual page one" in pages[0].text and "Safety warnings" in pages[1].text
    image = Image.open(__import__("io").BytesIO(kb.blobs.get(pages[0].image_ref)))
    assert max(image.size) == 1024 and image.size[0] > image.size[1]


def test_unrenderable_page_is_reported_not_raised(tmp_path: Path) -> None:
    pdf = tmp_path / "m.pdf"
    pdf.write_bytes(text_pdf(["one"]))
    (item,) = list(read_pdf(pdf))
    item.image_loader = lambda: (_ for _ in ()).throw(RuntimeError("pdfium: bad page"))
    with pytest.raises(UnprocessableInput, match="bad page"):
        item.read_image(10**7)


def test_ingestion_rules_keep_ids_stable() -> None:
    """Ids are persisted: the identity rule must never change (these values predate ``rules.py``)."""
    assert point_id_for(content_hash_of(b"img", "cap"), "cap", "a.png", None) == "22a53282-c84a-5509-8aea-c2530eed8914"
    assert point_id_for(content_hash_of(None, "text"), "text", "t.md", 3) == "d5341c5b-e20c-5ced-b2f4-194d02d9b0e5"
    assert point_id_for(content_hash_of(b"img", ""), "", "a.png", 2, "kb1") == "54adaf02-19cf-51a1-8795-926aa4c4cb2c"
    found = IngestRules(id_namespace="kb1").identify(IngestItem(source="a.png", key="k", text=" ", image_bytes=b"img",
                                                                 page=2))
    assert (found.text, found.point_id) == ("", "54adaf02-19cf-51a1-8795-926aa4c4cb2c")
    with pytest.raises(InvalidInput, match="no image and no text"):
        IngestRules().read(IngestItem(source="s", key="k", text="  "))
    with pytest.raises(InvalidInput, match="reader said no"):
        IngestRules().read(IngestItem(source="s", key="k", text="t", error="reader said no"))


def test_read_paths_dispatch(tmp_path: Path) -> None:
    (tmp_path / "weird.xyz").write_text("?")
    (tmp_path / "other.json").write_text('{"a": 1}')
    items = list(read_paths([tmp_path / "nope", tmp_path / "weird.xyz", tmp_path / "other.json"]))
    assert [bool(i.error) for i in items] == [True, True, True]
    assert "no such file" in items[0].error and "unsupported file type" in items[1].error


def test_one_dispatcher_for_files_folders_and_uploads(tmp_path: Path) -> None:
    from retriever.ingest.readers import READERS, STANDALONE_SUFFIXES, read_file

    (tmp_path / "notes.md").write_text("# A\n\nB.\n")
    (tmp_path / "list.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    assert {i.text for i in read_file(tmp_path / "list.jsonl", "list.jsonl")} == {"one", "two"}
    assert [i.text for i in read_file(tmp_path / "notes.md", "n")] == [i.text for i in read_paths([tmp_path / "notes.md"])]
    refused = list(read_file(tmp_path / "list.jsonl", "list.jsonl", accept=STANDALONE_SUFFIXES, hint="not here"))
    assert [i.error for i in refused] == ["unsupported file type '.jsonl': not here"]
    assert STANDALONE_SUFFIXES <= READERS.keys() and {".json", ".jsonl"}.isdisjoint(STANDALONE_SUFFIXES)
    folder = {i.source for i in read_folder(tmp_path)}  # the folder reads both through the same table
    assert folder == {f"{tmp_path.name}/notes.md", "list.jsonl#L1", "list.jsonl#L2"}


# --- knowledge base ---------------------------------------------------------------------------------


async def test_add_snippet_and_delete(kb: KnowledgeBase, sample_images, tmp_path: Path) -> None:
    path = save_images(tmp_path / "s", sample_images[:1])[0]
    data = path.read_bytes()
    point_id, created = await kb.add_snippet(data, "a caption", source="api", tags=["t"], filename="x.png")
    assert created
    assert await kb.add_snippet(data, "a caption", source="api", filename="x.png") == (point_id, False)
    other_id, _ = await kb.add_snippet(data, "same image, other text", source="api2")
    text_id, _ = await kb.add_snippet(None, "text only", source="api")
    with pytest.raises(InvalidInput):
        await kb.add_snippet(None, "  ")
    with pytest.raises(UnprocessableInput):
        await kb.add_snippet(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10, "bad", source="api")
    assert await kb.store.count() == 3
    stats = await kb.stats()
    assert stats["count"] == 3 and stats["by_kind"] == {"image_text": 2, "text": 1}
    assert stats["by_source"] == {"api": 2, "api2": 1} and stats["embedder"] == kb.embedder.identity

    point = await kb.get(point_id)
    await kb.delete(point_id)
    with pytest.raises(NotFound):
        await kb.get(point_id)
    assert kb.blobs.exists(point.payload.image_ref)  # still used by the "api2" snippet
    assert await kb.delete_by_source("api2") == 1
    assert not kb.blobs.exists(point.payload.image_ref) and not kb.blobs.exists(point.payload.thumb_ref)
    assert await kb.delete_by_source("api") == 1 and await kb.store.count() == 0
    assert text_id and other_id
    with pytest.raises(NotFound):
        await kb.delete("not-a-uuid")


async def test_delete_checks_blob_references_by_content_hash_not_by_scanning(
    kb: KnowledgeBase, sample_images, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pixel-identical originals with different bytes keep distinct thumbnails; delete never scrolls."""
    plain = png_bytes(sample_images[0], compress_level=1)
    recompressed = png_bytes(sample_images[0], compress_level=9)
    assert plain != recompressed  # same pixels, different bytes: different content_hash
    a_id, _ = await kb.add_snippet(plain, "a", source="s1")
    a_again_id, _ = await kb.add_snippet(plain, "a, captioned again", source="s2")
    b_id, _ = await kb.add_snippet(recompressed, "b", source="s3")
    a, b = await kb.get(a_id), await kb.get(b_id)
    assert a.payload.content_hash != b.payload.content_hash and a.payload.thumb_ref != b.payload.thumb_ref

    async def no_scroll(*args: object, **kwargs: object) -> None:
        raise AssertionError("delete must not scan the collection")

    monkeypatch.setattr(kb.store, "scroll", no_scroll)
    await kb.delete(a_id)
    assert kb.blobs.exists(a.payload.image_ref) and kb.blobs.exists(a.payload.thumb_ref)  # s2 uses them
    await kb.delete(a_again_id)
    assert not kb.blobs.exists(a.payload.image_ref) and not kb.blobs.exists(a.payload.thumb_ref)
    assert kb.blobs.exists(b.payload.image_ref) and kb.blobs.exists(b.payload.thumb_ref)
    assert (await kb.image_bytes(b_id, thumbnail=True))[0] == kb.blobs.get(b.payload.thumb_ref)


# --- kill -9 mid-run, re-run: exact count, no duplicate, no point without its image -----------------


def _noise_photos(folder: Path, count: int, size: int = 320) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(5)
    for i in range(count):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC).save(folder / f"p{i:04d}.jpg",
                                                                                   quality=85)


def _ingest_then_kill(photos: Path, data_dir: Path, env: dict[str, str], after_blobs: int) -> None:
    """Run `vlmrag ingest` in a subprocess; SIGKILL it once some chunks are written."""
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "ingest", str(photos), "--batch-size", "8"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    blob_root = data_dir / "blobs"
    deadline = time.monotonic() + 120
    try:
        # Kill once a few chunks have been written (blobs land before their points).
        while sum(1 for p in blob_root.rglob("*.jpg")) < after_blobs:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "ingestion never started"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
        proc.stderr.close()


@pytest.mark.e2e
@pytest.mark.subprocess
async def test_killed_ingestion_resumes_exactly(make_store, embedder, tiny_clip_config, tmp_path: Path) -> None:
    total = 300
    _noise_photos(tmp_path / "photos", total, size=256)
    data_dir = tmp_path / "data"
    env = {**os.environ, "VLMRAG_CLIP_MODEL": str(tiny_clip_config), "VLMRAG_CLIP_PRETRAINED": "none",
           "VLMRAG_DATA_DIR": str(data_dir), "VLMRAG_COLLECTION": "vlmrag-test", "VLMRAG_CLIP_DEVICE": "cpu"}
    await asyncio.to_thread(_ingest_then_kill, tmp_path / "photos", data_dir, env, 40)

    store = await make_store("edge", path=data_dir / "qdrant")
    partial = await store.count()
    assert 0 < partial < total, f"the run was not interrupted mid-way ({partial}/{total})"
    blob_root = data_dir / "blobs"
    blobs = LocalBlobStore(blob_root)
    kb = KnowledgeBase(embedder, store, blobs, pipeline=IngestPipeline(embedder, store, blobs, batch_size=16))
    report = await kb.ingest(read_folder(tmp_path / "photos"))
    assert report.skipped_existing == partial and report.ingested == total - partial and report.failed == 0
    points = await all_points(kb)
    assert len(points) == total == await store.count()
    assert len({p.payload.source for p in points}) == total
    for point in points:
        assert blobs.exists(point.payload.image_ref) and blobs.exists(point.payload.thumb_ref)
