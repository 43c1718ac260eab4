"""Zero-downtime re-index on both adapters: Qdrant Edge (symlink pointer) and qdrant-client (alias).

"Changing the model" = a second tiny CLIP config with another embed_dim (a different vector space).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from retriever.blobs import LocalBlobStore
from retriever.embedder import ClipEmbedder, load_embedder
from retriever.errors import Conflict, NotFound
from retriever.plan import RetrievalPlan
from retriever.reindex import AliasVersions, EdgeVersions, drop_old_versions, reindex, version_number
from retriever.store import open_store
from retriever.store.base import VectorStore
from retriever.store.edge import META_FILE, EdgeStore
from retriever.types import PointRecord, SnippetPayload
from server.cli import main as cli_main
from tests.support.media import png_bytes
from tests.support.tiny_clip import TINY_CLIP_CONFIG

COLLECTION = "kb"
CAPTIONS = ["a red bicycle", "pump pressure gauge", "wiring diagram of the fuse box", "blue kettle",
            "the reset button on the router", "a cracked screen"]


@pytest.fixture(scope="module")
def new_embedder(tmp_path_factory: pytest.TempPathFactory) -> ClipEmbedder:
    """Another tiny CLIP (embed_dim 24 instead of 32): a new, incompatible vector space."""
    config = json.loads(json.dumps(TINY_CLIP_CONFIG))
    config["embed_dim"] = 24
    path = tmp_path_factory.mktemp("tiny_clip_b") / "vlmrag-tiny-clip-b.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return load_embedder(str(path), "none", device="cpu", batch_size=8)


def make_points(embedder: ClipEmbedder, blobs: LocalBlobStore, images: list[Image.Image]) -> list[PointRecord]:
    """Image+caption, image-only and text-only snippets, embedded with ``embedder`` like ingestion does."""
    points: list[PointRecord] = []
    image_vecs = embedder.embed_images(images)
    text_vecs = embedder.embed_texts(CAPTIONS)
    for i, image in enumerate(images):
        key = blobs.put(png_bytes(image), ".png")
        vectors = {"image": image_vecs[i].tolist()}
        text = CAPTIONS[i] if i % 2 == 0 else ""
        if text:
            vectors["text"] = text_vecs[i].tolist()
        kind = "image_text" if text else "image"
        points.append(PointRecord(str(uuid.uuid4()), vectors,
                                  SnippetPayload(kind=kind, text=text, source=f"img{i}.png", image_ref=key)))
    for text in ("how to descale the kettle", "warranty terms"):
        points.append(PointRecord(str(uuid.uuid4()), {"text": embedder.embed_texts([text])[0].tolist()},
                                  SnippetPayload(kind="text", text=text, source="manual.md")))
    return points


async def _check_new_space(store: VectorStore, embedder: ClipEmbedder, points: list[PointRecord],
                           images: list[Image.Image]) -> None:
    """The switched store answers in the new space: each image finds itself, each caption its snippet."""
    assert await store.embedder_id() == embedder.identity
    assert await store.count() == len(points)
    for point, vec in zip(points, embedder.embed_images(images)):
        hits = await store.search("image", vec.tolist(), 1)
        assert hits[0].id == point.id and hits[0].score == pytest.approx(1.0, abs=1e-3)
    text_points = [p for p in points if p.payload.text]
    for point, vec in zip(text_points, embedder.embed_texts([p.payload.text for p in text_points])):
        assert (await store.search("text", vec.tolist(), 1))[0].id == point.id


@pytest.fixture
def blobs(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "blobs", fsync=False)


async def _seed_edge(path: Path, embedder: ClipEmbedder, points: list[PointRecord]) -> None:
    store = EdgeStore(path, COLLECTION)
    await store.open()
    await store.ensure_collection(embedder.dim, embedder.identity)
    await store.upsert(points)
    await store.close()


# --- Qdrant Edge ---------------------------------------------------------------------------------
async def test_edge_reindex_switches_pointer_and_keeps_old(
    tmp_path: Path, embedder: ClipEmbedder, new_embedder: ClipEmbedder, blobs: LocalBlobStore,
    sample_images: list[Image.Image],
) -> None:
    path = tmp_path / "qdrant"
    points = make_points(embedder, blobs, sample_images)
    await _seed_edge(path, embedder, points)
    versions = EdgeVersions(path, COLLECTION)

    result = await reindex(versions, new_embedder, blobs, batch_size=3)
    assert (result.old, result.new, result.switched) == (COLLECTION, f"{COLLECTION}__v2", True)
    assert result.copied == len(points) and not result.skipped and not result.text_only
    assert result.store is not None
    await versions.release(result.store)

    pointer = path / f"{COLLECTION}__current"
    assert pointer.is_symlink() and os.readlink(pointer) == f"{COLLECTION}__v2"
    # the old version is untouched until --drop-old
    old_meta = json.loads((path / COLLECTION / META_FILE).read_text(encoding="utf-8"))
    assert old_meta["embedder_id"] == embedder.identity

    served = EdgeStore(path, COLLECTION)  # what `vlmrag serve` opens: resolves the pointer
    await served.open()
    try:
        await served.ensure_collection(new_embedder.dim, new_embedder.identity)  # no Conflict
        await _check_new_space(served, new_embedder, points, sample_images)
        payloads = {p.id: p.payload for p in await served.retrieve([p.id for p in points])}
        assert payloads == {p.id: p.payload for p in points}  # payloads carried over unchanged
    finally:
        await served.close()

    # and back to the first model: v3, then drop everything but the served version
    back = await reindex(versions, embedder, blobs)
    await versions.release(back.store)  # type: ignore[arg-type]
    assert back.new == f"{COLLECTION}__v3" and os.readlink(pointer) == f"{COLLECTION}__v3"
    assert await drop_old_versions(versions) == [COLLECTION, f"{COLLECTION}__v2"]
    assert sorted(p.name for p in path.iterdir()) == [f"{COLLECTION}__current", f"{COLLECTION}__v3"]
    served = EdgeStore(path, COLLECTION)
    await served.open()
    try:
        await _check_new_space(served, embedder, points, sample_images)
    finally:
        await served.close()


async def test_edge_no_switch_then_resume(
    tmp_path: Path, embedder: ClipEmbedder, new_embedder: ClipEmbedder, blobs: LocalBlobStore,
    sample_images: list[Image.Image],
) -> None:
    path = tmp_path / "qdrant"
    points = make_points(embedder, blobs, sample_images)
    await _seed_edge(path, embedder, points)
    versions = EdgeVersions(path, COLLECTION)
    built = await reindex(versions, new_embedder, blobs, switch=False)
    await versions.release(built.store)  # type: ignore[arg-type]
    assert not built.switched and await versions.current() == COLLECTION
    assert not (path / f"{COLLECTION}__current").exists()
    # the second run finds the built version for the same model: nothing re-embedded, then switch
    resumed = await reindex(versions, new_embedder, blobs)
    await versions.release(resumed.store)  # type: ignore[arg-type]
    assert (resumed.new, resumed.copied, resumed.resumed) == (f"{COLLECTION}__v2", 0, len(points))
    assert await versions.current() == f"{COLLECTION}__v2"
    with pytest.raises(Conflict, match="nothing to re-index"):
        await reindex(versions, new_embedder, blobs)


async def test_edge_nothing_to_reindex(tmp_path: Path, new_embedder: ClipEmbedder, blobs: LocalBlobStore) -> None:
    with pytest.raises(NotFound, match="ingest first"):
        await reindex(EdgeVersions(tmp_path / "empty", COLLECTION), new_embedder, blobs)


class _WritesDuringBuild:
    """The served store with another writer: right after the copy has read the last page, one
    snippet is added and one deleted (what a serving process does while the copy runs)."""

    def __init__(self, store: VectorStore, add: PointRecord, delete_id: str) -> None:
        self._store, self._add, self._delete_id, self._fired = store, add, delete_id, False

    async def scroll(self, *args: Any, **kwargs: Any) -> Any:
        page = await self._store.scroll(*args, **kwargs)
        if not self._fired and page[1] is None:
            self._fired = True
            await self._store.upsert([self._add])
            await self._store.delete([self._delete_id])
        return page

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


async def test_writes_during_build_are_caught_up_and_missing_images_degrade(
    tmp_path: Path, embedder: ClipEmbedder, new_embedder: ClipEmbedder, blobs: LocalBlobStore,
    sample_images: list[Image.Image],
) -> None:
    path = tmp_path / "qdrant"
    points = make_points(embedder, blobs, sample_images)
    # one captioned image whose blob is gone (kept text-only), one uncaptioned (skipped)
    blobs.delete(points[0].payload.image_ref or "")
    blobs.delete(points[1].payload.image_ref or "")
    await _seed_edge(path, embedder, points)
    late = PointRecord(str(uuid.uuid4()), {"text": embedder.embed_texts(["added late"])[0].tolist()},
                       SnippetPayload(kind="text", text="added late", source="late.md"))
    deleted = points[-1].id
    source = EdgeStore(path, COLLECTION)
    await source.open()
    versions = EdgeVersions(path, COLLECTION)
    try:
        result = await reindex(versions, new_embedder, blobs, batch_size=4,
                               source=_WritesDuringBuild(source, late, deleted))  # type: ignore[arg-type]
    finally:
        await source.close()  # load new, switch, close old: the caller closes its own store
    target = result.store
    assert target is not None
    try:
        assert result.caught_up == 1 and result.removed == 1
        assert [s.split(":")[0] for s in result.text_only] == [points[0].id]
        assert [s.split(":")[0] for s in result.skipped] == [points[1].id]
        ids = {p.id for p in (await target.scroll(limit=100))[0]}
        assert late.id in ids and deleted not in ids and points[1].id not in ids
        assert await target.count() == len(points) - 1  # +late, -deleted, -skipped
    finally:
        await versions.release(target)


# --- qdrant-client (alias) -----------------------------------------------------------------------
async def test_alias_reindex_retires_plain_collection_then_switches_atomically(
    tmp_path: Path, embedder: ClipEmbedder, new_embedder: ClipEmbedder, blobs: LocalBlobStore,
    sample_images: list[Image.Image],
) -> None:
    points = make_points(embedder, blobs, sample_images)
    store = await open_store(qdrant_url=f"local:{tmp_path / 'local'}", api_key="", path=tmp_path,
                             collection=COLLECTION)
    try:
        await store.ensure_collection(embedder.dim, embedder.identity)
        await store.upsert(points)
        client = store.client  # type: ignore[attr-defined]
        versions = AliasVersions(client, COLLECTION)

        result = await reindex(versions, new_embedder, blobs, batch_size=3)
        assert (result.old, result.new, result.switched) == (COLLECTION, f"{COLLECTION}__v2", True)
        aliases = {a.alias_name: a.collection_name for a in (await client.get_aliases()).aliases}
        assert aliases == {COLLECTION: f"{COLLECTION}__v2"}
        names = {c.name for c in (await client.get_collections()).collections}
        assert names == {f"{COLLECTION}__v1", f"{COLLECTION}__v2"}  # the old one kept as v1
        old = await versions.open(f"{COLLECTION}__v1")
        assert await old.embedder_id() == embedder.identity and await old.count() == len(points)

        served = await versions.open(COLLECTION)  # through the alias, as the service does
        await _check_new_space(served, new_embedder, points, sample_images)

        back = await reindex(versions, embedder, blobs)
        assert back.new == f"{COLLECTION}__v3"
        aliases = {a.alias_name: a.collection_name for a in (await client.get_aliases()).aliases}
        assert aliases == {COLLECTION: f"{COLLECTION}__v3"}
        assert await drop_old_versions(versions) == [f"{COLLECTION}__v1", f"{COLLECTION}__v2"]
        assert {c.name for c in (await client.get_collections()).collections} == {f"{COLLECTION}__v3"}
        fresh = AliasVersions(client, COLLECTION)
        await _check_new_space(await fresh.open(COLLECTION), embedder, points, sample_images)
        with pytest.raises(Conflict):
            await versions.drop(f"{COLLECTION}__v3")
    finally:
        await store.close()


def test_version_names() -> None:
    assert version_number("kb", "kb") == 1 and version_number("kb", "kb__v12") == 12
    assert version_number("kb", "kb__v") is None and version_number("kb", "kbx__v2") is None
    assert version_number("kb", "kb__current") is None


# --- CLI -----------------------------------------------------------------------------------------
def test_cli_reindex_and_drop_old(
    tmp_path: Path, embedder: ClipEmbedder, new_embedder: ClipEmbedder, tiny_clip_config: Path,
    sample_images: list[Image.Image], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    import asyncio

    data = tmp_path / "data"
    blobs = LocalBlobStore(data / "blobs")
    points = make_points(embedder, blobs, sample_images)
    asyncio.run(_seed_edge(data / "qdrant", embedder, points))
    for key in [k for k in os.environ if k.startswith("VLMRAG_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no stray .env
    monkeypatch.setenv("VLMRAG_DATA_DIR", str(data))
    monkeypatch.setenv("VLMRAG_COLLECTION", COLLECTION)
    monkeypatch.setenv("VLMRAG_CLIP_MODEL", str(tiny_clip_config))
    monkeypatch.setenv("VLMRAG_CLIP_PRETRAINED", "none")
    monkeypatch.setenv("VLMRAG_TEXT_EMBEDDER", "none")
    new_config = tmp_path / "vlmrag-tiny-clip-b.json"
    config = json.loads(json.dumps(TINY_CLIP_CONFIG))
    config["embed_dim"] = 24
    new_config.write_text(json.dumps(config), encoding="utf-8")

    assert cli_main(["reindex", "--to", str(new_config), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["new"] == f"{COLLECTION}__v2" and summary["switched"] and summary["copied"] == len(points)
    assert summary["embedder"] == new_embedder.identity

    assert cli_main(["reindex", "--drop-old", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"dropped": [COLLECTION]}
    assert cli_main(["reindex"]) == 2  # nothing asked: a usage error, not a crash
    assert "nothing to do" in capsys.readouterr().err


def test_backfill_lexical_gives_an_old_edge_collection_bm25(
    tmp_path: Path, embedder: ClipEmbedder, tiny_clip_config: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A shard made before `lexical` (no sparse vector): backfill-lexical rebuilds and switches to one with it."""
    import asyncio

    import qdrant_edge as qe

    from retriever.search import Retriever
    from retriever.store.edge import EdgeStore
    from retriever.types import PointRecord, SnippetPayload

    data = tmp_path / "data"
    shard = data / "qdrant" / COLLECTION
    dense = {name: qe.EdgeVectorParams(size=embedder.dim, distance=qe.Distance.Cosine) for name in ("image", "text")}
    qe.EdgeShard.create(str(shard), qe.EdgeConfig(vectors=dense)).close()

    async def seed() -> None:
        store = EdgeStore(data / "qdrant", COLLECTION)
        await store.open()
        await store.ensure_collection(embedder.dim, embedder.identity)
        texts = ["Error E-417: the pump overheated.", "Part P-100-B is the seal kit.", "Clean weekly."]
        await store.upsert([PointRecord(f"00000000-0000-0000-0000-00000000000{i}",
                                        {"text": embedder.embed_texts([t])[0].tolist()},
                                        SnippetPayload(kind="text", text=t, content_hash=f"h{i}"))
                            for i, t in enumerate(texts)])
        assert not await store.has_lexical()
        await store.close()

    asyncio.run(seed())
    for key in [k for k in os.environ if k.startswith("VLMRAG_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VLMRAG_DATA_DIR", str(data))
    monkeypatch.setenv("VLMRAG_COLLECTION", COLLECTION)
    monkeypatch.setenv("VLMRAG_CLIP_MODEL", str(tiny_clip_config))
    monkeypatch.setenv("VLMRAG_CLIP_PRETRAINED", "none")
    monkeypatch.setenv("VLMRAG_TEXT_EMBEDDER", "none")
    assert cli_main(["backfill-lexical", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["switched"] and summary["copied"] == 3

    async def check() -> None:
        store = EdgeStore(data / "qdrant", COLLECTION)
        await store.open()
        try:
            assert await store.has_lexical()
            found = await Retriever(embedder, store).search("E-417", plan=RetrievalPlan(pool=3, mode="lexical"))
            assert found.candidates[0].payload.text.startswith("Error E-417")
        finally:
            await store.close()

    asyncio.run(check())
