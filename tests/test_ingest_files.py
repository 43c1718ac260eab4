"""POST /v1/ingest/files (server/routes/ingest_files.py): one report per uploaded file."""

from __future__ import annotations

import httpx
import pytest

from retriever.embedder import ClipEmbedder
from server.app import create_app
from server.services.ingestion import safe_filename
from server.settings import Settings
from server.wiring import build_knowledge_base
from tests.support.fake_vllm import FakeVLLM
from tests.support.fixtures_retriever import make_sample_images
from tests.support.fixtures_server import running_client
from tests.support.media import noise_png, pdf_bytes, png_bytes

NOTES = b"# Care\n\nOil the chain.\n\n# Warranty\n\nTwo years.\n"


async def test_each_file_gets_its_own_report(client: httpx.AsyncClient) -> None:
    images = make_sample_images(3)
    files = [
        ("files", ("manual.pdf", pdf_bytes(images[:2]), "application/pdf")),
        ("files", ("notes.md", NOTES, "text/markdown")),
        ("files", ("photo.png", png_bytes(images[2]), "image/png")),
        ("files", ("tool.exe", b"MZ\x90\x00", "application/octet-stream")),
    ]
    response = await client.post("/v1/ingest/files", files=files, data={"tags": ["docs"]})
    assert response.status_code == 200, response.text
    reports = {r["filename"]: r for r in response.json()["files"]}
    assert [r["filename"] for r in response.json()["files"]] == ["manual.pdf", "notes.md", "photo.png", "tool.exe"]
    assert (reports["manual.pdf"]["ingested"], reports["notes.md"]["ingested"], reports["photo.png"]["ingested"]) \
        == (2, 2, 1)
    assert reports["tool.exe"]["ingested"] == 0 and reports["tool.exe"]["failed"] == 1
    assert "unsupported file type '.exe'" in reports["tool.exe"]["failures"][0]["reason"]

    pages = (await client.get("/v1/snippets", params={"source": "manual.pdf"})).json()["items"]
    assert sorted(p["page"] for p in pages) == [1, 2]
    assert all(p["kind"] == "page" and p["tags"] == ["docs"] and p["thumbnail_url"] for p in pages)
    assert set(reports["manual.pdf"]["ids"]) == {p["id"] for p in pages}

    again = await client.post("/v1/ingest/files", files=files[:2])
    assert [(r["ingested"], r["existing"]) for r in again.json()["files"]] == [(0, 2), (0, 2)]


async def test_oversized_image_is_reported_as_413(
    settings: Settings, embedder: ClipEmbedder, fake_vllm: FakeVLLM
) -> None:
    small = settings.model_copy(update={"limit_image_bytes": 20_000})
    kb = await build_knowledge_base(small, embedder=embedder)  # the pipeline takes its limits from here
    try:
        app = create_app(small, knowledge_base=kb, vllm_transport=httpx.MockTransport(fake_vllm))
        async with running_client(app) as client:
            response = await client.post("/v1/ingest/files", files=[("files", ("big.png", noise_png(120), "image/png"))])
    finally:
        await kb.close()
    report = response.json()["files"][0]
    assert (report["ingested"], report["failed"]) == (0, 1)
    assert report["failures"][0]["status"] == 413


async def test_refuses_an_empty_request_and_too_many_files(make_client) -> None:  # type: ignore[no-untyped-def]
    async with make_client(limit_upload_files=1) as client:
        empty = await client.post("/v1/ingest/files", data={"tags": "x"})
        assert empty.status_code in (400, 422) and "error" in empty.json()
        two = [("files", (f"n{i}.txt", b"hello", "text/plain")) for i in range(2)]
        too_many = await client.post("/v1/ingest/files", files=two)
        assert too_many.status_code == 400
        assert too_many.json()["error"]["code"] == "too_many_files"


@pytest.mark.parametrize(("name", "expected"), [
    ("../../etc/passwd", "passwd"), ("C:\\Users\\me\\report.pdf", "report.pdf"), ("", "upload-1"),
    ("a<b>|c.txt", "a_b_c.txt"), ("..", "upload-1"),
])
def test_safe_filename(name: str, expected: str) -> None:
    assert safe_filename(name, 0) == expected


async def test_manifests_are_refused_as_uploads(client: httpx.AsyncClient, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A JSONL or COCO manifest names files beside it: uploaded, it must not reach the server's own files."""
    secret = tmp_path / "secret.png"
    secret.write_bytes(png_bytes(make_sample_images(1)[0]))
    files = [
        ("files", ("list.jsonl", f'{{"image": "{secret}", "text": "x"}}\n'.encode(), "application/jsonl")),
        ("files", ("captions.json", b'{"images": [], "annotations": []}', "application/json")),
    ]
    response = await client.post("/v1/ingest/files", files=files)
    assert response.status_code == 200, response.text
    for report in response.json()["files"]:
        assert (report["ingested"], report["failed"]) == (0, 1)
        assert "unsupported file type" in report["failures"][0]["reason"]
        assert "upload PDF, text, Markdown or image files" in report["failures"][0]["reason"]
