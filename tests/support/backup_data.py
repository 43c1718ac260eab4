"""Helpers of the backup tests: fill a data dir (two KBs, answers, a rating) and read back everything in it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from retriever.blobs import LocalBlobStore
from retriever.embedder import ClipEmbedder
from retriever.reindex import EdgeVersions
from server.feedback import AnswerLog, AnswerRecord, feedback_database_url
from server.knowledge_bases import KBCatalog, KBSpec, blob_namespace, collection_for, database_url
from server.settings import Settings
from server.wiring import build_blob_store, build_knowledge_base, open_configured_store
from tests.support.fixtures_server import ingest_samples
from tests.support.media import png_bytes

KBS = ("default", "pumps")


async def populate(settings: Settings, embedder: ClipEmbedder) -> None:
    """The sample snippets in ``default``; KB ``pumps`` with three snippets; two answers, one rated."""
    catalog = KBCatalog(database_url(settings))
    await catalog.insert(KBSpec("pumps", display_name="Pumps", description="pump manuals",
                                retrieval={"k": 3}, created_at=time.time()))
    catalog.close()
    kb = await build_knowledge_base(settings, embedder=embedder)
    try:
        await ingest_samples(kb)
    finally:
        await kb.close()
    from tests.support.fixtures_retriever import make_sample_images

    pumps = await build_knowledge_base(settings, embedder=embedder, collection=collection_for(settings, "pumps"),
                                       blob_namespace=blob_namespace("pumps"))
    try:
        images = make_sample_images(6)
        await pumps.add_snippet(png_bytes(images[4]), "pump P-100 exploded view", "p100.png", ["pump"])
        await pumps.add_snippet(png_bytes(images[5]), None, "p200.png")
        await pumps.add_snippet(None, "Error E-417: the impeller is blocked.", "errors.txt")
    finally:
        await pumps.close()
    log = AnswerLog.from_settings(settings)
    try:
        for i, kb_name in enumerate(KBS):
            await log.record(AnswerRecord(f"chatcmpl-{i}", "key:abc", kb_name, f"question {i}", None,
                                          [{"id": "s1", "kept": True}], "vlmrag", {"k": 3}, time.time(),
                                          answer=f"answer {i}"))
        await log.add_feedback("chatcmpl-1", "key:abc", "down", "wrong pump", ["s1"])
    finally:
        log.close()


async def read_kb(settings: Settings, name: str) -> dict[str, Any]:
    """Every point (payload, vectors, lexical) and blob of KB ``name``."""
    store = await open_configured_store(settings, collection_for(settings, name))
    try:
        points = {}
        async for batch in store.export_points():
            for p in batch:
                points[p.id] = {"payload": p.payload.to_dict(), "vectors": p.vectors,
                                "lexical": (list(p.lexical.indices), list(p.lexical.values)) if p.lexical else None}
        embedder = await store.embedder_id()
    finally:
        await store.close()
    blobs = build_blob_store(settings, blob_namespace(name))
    data = {}
    for point in points.values():
        for ref in (point["payload"]["image_ref"], point["payload"]["thumb_ref"]):
            if ref:
                data[ref] = blobs.get(ref)
    return {"points": points, "blobs": data, "embedder": embedder}


def read_rows(settings: Settings) -> dict[str, list[dict[str, Any]]]:
    rows = {}
    for url, tables in ((database_url(settings), ["knowledge_bases"]),
                        (feedback_database_url(settings), ["answers", "feedback"])):
        engine = sa.create_engine(url)
        try:
            meta = sa.MetaData()
            meta.reflect(engine, only=tables)
            with engine.connect() as conn:
                for table in tables:
                    t = meta.tables[table]
                    rows[table] = [dict(r._mapping) for r in conn.execute(sa.select(t).order_by(*t.primary_key))]
        finally:
            engine.dispose()
    return rows


def read_all(settings: Settings) -> dict[str, Any]:
    async def kbs() -> dict[str, Any]:
        return {name: await read_kb(settings, name) for name in KBS}

    return {"kbs": asyncio.run(kbs()), "rows": read_rows(settings)}


def served_versions(settings: Settings) -> dict[str, Any]:
    """Which version of each KB's collection is served, and which exist (embedded store)."""
    def state(name: str) -> tuple[str | None, list[str]]:
        versions = EdgeVersions(Path(settings.embedded_store_path), collection_for(settings, name))
        return asyncio.run(versions.current()), asyncio.run(versions.versions())

    return {name: state(name) for name in KBS}


def assert_same_content(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Ids, payloads, lexical vectors, blob bytes and rows equal; dense vectors within float16 tolerance."""
    import numpy as np

    assert got["rows"] == want["rows"]
    for name, kb in want["kbs"].items():
        other = got["kbs"][name]
        assert set(other["points"]) == set(kb["points"]), name
        assert other["embedder"] == kb["embedder"]
        assert other["blobs"] == kb["blobs"]
        for pid, point in kb["points"].items():
            mine = other["points"][pid]
            assert mine["payload"] == point["payload"]
            assert mine["lexical"] == point["lexical"]
            assert set(mine["vectors"]) == set(point["vectors"])
            for vname, vector in point["vectors"].items():
                np.testing.assert_allclose(mine["vectors"][vname], vector, atol=2e-3, rtol=1e-3)


def local_blob_files(settings: Settings) -> list[Path]:
    root = LocalBlobStore(settings.blob_dir).root
    return sorted(p for p in root.rglob("*") if p.is_file())


async def add_snippet(settings: Settings) -> None:
    """One more image snippet in the default KB (with a new blob and thumbnail)."""
    from server.wiring import build_embedder
    from tests.support.fixtures_retriever import make_sample_images

    kb = await build_knowledge_base(settings, embedder=build_embedder(settings.model_copy(
        update={"clip_backend": "torch"})))
    try:
        await kb.add_snippet(png_bytes(make_sample_images(8)[7]), "a later snippet", "later.png")
    finally:
        await kb.close()
