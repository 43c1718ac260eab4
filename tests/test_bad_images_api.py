"""Every image of the bad-image corpus through the API and the CLI: a 4xx or correct handling, never a 5xx."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from server.cli import main as cli_main
from tests.support.bad_images import OK, bad_image_corpus, write_bad_images
from tests.support.fake_vllm import FakeVLLM
from tests.support.fixtures_server import MakeClient
from tests.support.media import data_url

CORPUS = bad_image_corpus()
UNLIMITED = {"rate_limit_burst": 100_000}  # dozens of requests back to back: not a rate-limit test


@pytest_asyncio.fixture
async def client(make_client: MakeClient) -> AsyncIterator[httpx.AsyncClient]:
    async with make_client(**UNLIMITED) as c:
        yield c


def _expected(status: int, created: int = 200) -> set[int]:
    return {created} if status == OK else {status}


def _image_parts(body: dict[str, object]) -> int:
    return sum(1 for m in body["messages"] if isinstance(m["content"], list)  # type: ignore[index, union-attr]
               for p in m["content"] if p["type"] == "image_url")


async def test_corpus_through_chat_completions(client: httpx.AsyncClient, fake_vllm: FakeVLLM) -> None:
    """As data URLs in an ``image_url`` part (always labelled image/png: the content decides)."""
    outcomes = {}
    for name, (data, status) in CORPUS.items():
        url = data_url(data)
        before = len(fake_vllm.answer_bodies)
        response = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is in this picture?"}, {"type": "image_url", "image_url": {"url": url}}]}],
            "retrieval": {"enabled": False}})
        outcomes[name] = response.status_code
        if status == OK:
            assert response.status_code == 200, (name, response.text)
            assert _image_parts(fake_vllm.answer_bodies[-1]) == 1  # the decoded image reached the model
        else:
            assert response.json()["error"]["param"], (name, response.text)
            assert len(fake_vllm.answer_bodies) == before  # refused before any model call
    assert outcomes == {name: min(_expected(status)) for name, (_, status) in CORPUS.items()}


async def test_corpus_through_ask_multipart(client: httpx.AsyncClient) -> None:
    outcomes = {}
    for name, (data, _) in CORPUS.items():
        response = await client.post("/v1/ask", data={"question": "what is this?"},
                                     files={"image": (name, data, "application/octet-stream")})
        outcomes[name] = response.status_code
        if response.status_code != 200:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert outcomes == {name: min(_expected(status)) for name, (_, status) in CORPUS.items()}


async def test_corpus_through_snippets(client: httpx.AsyncClient) -> None:
    outcomes = {}
    for name, (data, status) in CORPUS.items():
        response = await client.post("/v1/snippets", data={"text": f"caption of {name}", "source": name},
                                     files={"image": (name, data, "image/png")})
        outcomes[name] = response.status_code
        if status == OK:
            assert response.status_code in (200, 201), (name, response.text)
            snippet_id = response.json()["id"]
            image = await client.get(f"/v1/snippets/{snippet_id}/thumbnail")
            assert image.status_code == 200 and image.headers["content-type"].startswith("image/")
    expected = {name: min(_expected(status, 201)) for name, (_, status) in CORPUS.items()}
    # An empty upload is refused by the route itself (400) before the decoder sees it (422).
    assert outcomes.pop("zero_bytes.jpg") in (400, 422)
    expected.pop("zero_bytes.jpg")
    # The same bytes twice ("good.png" / "png_named.jpg") dedupe to 200 instead of 201.
    assert outcomes.pop("png_named.jpg") in (200, 201)
    expected.pop("png_named.jpg")
    assert outcomes == expected


def test_corpus_through_cli_ingest(tmp_path: Path, tiny_clip_config: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    written = write_bad_images(tmp_path / "corpus")
    for key, value in {"VLMRAG_DATA_DIR": str(tmp_path / "data"), "VLMRAG_CLIP_MODEL": str(tiny_clip_config),
                       "VLMRAG_CLIP_PRETRAINED": "none", "VLMRAG_CLIP_DEVICE": "cpu"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)  # no stray .env

    code = cli_main(["ingest", "--json", str(tmp_path / "corpus")])
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert code == 0  # some items landed, so a partial run is a success
    failed = {Path(f["source"]).name for f in report["failures"]} | {Path(f["key"]).name for f in report["failures"]}
    bad = {name for name, (_, status) in written.items() if status != OK}
    good = set(written) - bad
    reported = bad & failed
    # Every bad file the reader picked up is reported (and named on stderr); none is ingested.
    assert reported and all(name in err for name in reported)
    unreported = bad - failed
    assert unreported <= {"image.tiff", "image.bmp"}, unreported  # only extensions the reader never lists
    assert not (good & failed), good & failed
    # png_named.jpg has the same bytes as good.png: stored once
    assert report["ingested"] + report["skipped_existing"] == len(good)
    assert report["failed"] == len(reported)
