"""``vlmrag backup`` / ``vlmrag restore``: round trips, bad archives, kills, consistency while ingesting.

Real parts: the embedded Qdrant Edge store, local blobs, SQLite (PostgreSQL where noted), the CLI
through ``server.cli.main``, child processes killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from retriever.backup import ArchiveReader
from retriever.embedder import ClipEmbedder
from server.cli import main
from server.settings import Settings
from tests.support.backup_data import (
    assert_same_content,
    populate,
    read_all,
    served_versions,
)
from tests.support.settings import bare_settings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def data(cli_env: Path, embedder: ClipEmbedder) -> Settings:
    """A data dir (the CLI's, from cli_env) with two KBs, their blobs, answers and a rating."""
    settings = bare_settings()
    asyncio.run(populate(settings, embedder))
    return settings


def error_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return [line for line in captured.err.splitlines() if line.startswith("error:")]


def test_round_trip_backup_wipe_restore(data: Settings, tmp_path: Path, capsys) -> None:
    before = read_all(data)
    out = tmp_path / "full.vlmrag.tar"
    assert main(["backup", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kbs"]["default"]["points"] == 6 and summary["kbs"]["pumps"]["points"] == 3
    assert summary["database"] == {"knowledge_bases": 1, "answers": 2, "feedback": 1}
    assert not list(tmp_path.glob(".*partial*"))
    with ArchiveReader(out) as reader:
        manifest = reader.manifest
        reader.verify()
    assert manifest["format_version"] == 2 and manifest["vlmrag_version"]
    assert manifest["embedders"] == [{"id": before["kbs"]["default"]["embedder"], "dim": 32}]
    assert set(manifest["kbs"]["default"]["vectors"]) == {"image", "text"}  # by name, as stored
    assert all(len(m["sha256"]) == 64 for m in manifest["members"].values())

    assert {e["method"] for e in manifest["kbs"].values()} == {"edge-shard"}  # the embedded store: its shards
    assert any(n.startswith("kbs/pumps/shard/segments/") for n in manifest["members"])
    assert not any(n.endswith("points.jsonl") for n in manifest["members"])
    assert summary["kbs"]["default"]["blobs"] == len(before["kbs"]["default"]["blobs"])

    shutil.rmtree(data.data_dir)
    assert main(["restore", str(out)]) == 0
    after = read_all(data)
    assert_same_content(after, before)
    for name, kb in before["kbs"].items():  # the shard's own files: vectors exactly as stored, not re-rounded
        assert {pid: p["vectors"] for pid, p in after["kbs"][name]["points"].items()} == \
            {pid: p["vectors"] for pid, p in kb["points"].items()}
    # restored into a new version, served through the pointer
    assert served_versions(data)["default"][0] == "vlmrag__v2"
    assert not list((Path(data.data_dir) / "backup-staging").glob("*/*"))


def test_format_1_archive_still_restores(data: Settings, tmp_path: Path, capsys) -> None:
    """An archive of format 1 (logical, no ``method``) as vlmrag wrote them before edge-shard."""
    before = read_all(data)
    logical = tmp_path / "logical.vlmrag.tar"
    assert main(["backup", str(logical), "--format", "logical", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert {k["method"] for k in summary["kbs"].values()} == {"logical"}

    def as_format_1(name: str, data: bytes) -> bytes:
        if name != "manifest.json":
            return data
        manifest = json.loads(data)
        manifest["format_version"] = 1
        for entry in manifest["kbs"].values():
            del entry["method"]
        return json.dumps(manifest).encode()

    old = tmp_path / "v1.vlmrag.tar"
    _rewrite(logical, old, as_format_1)
    with ArchiveReader(old) as reader:
        assert reader.manifest["format_version"] == 1 and "points.jsonl" in "".join(reader.members)
    shutil.rmtree(data.data_dir)
    assert main(["restore", str(old)]) == 0
    assert_same_content(read_all(data), before)


async def test_a_blob_deleted_after_the_freeze_is_still_archived(tmp_path: Path) -> None:
    """Local blobs are archived from the store after the freeze: deletes wait until they are in."""
    from retriever.blobs import LocalBlobStore

    blobs = LocalBlobStore(tmp_path / "blobs")
    key = blobs.put(b"image bytes", ".png")
    again = blobs.put(b"kept", ".png")
    with blobs.deletes_held():
        blobs.delete(key)
        blobs.delete(again)
        assert blobs.get(key) == b"image bytes"
        blobs.put(b"kept", ".png")  # put again while its delete waits: kept
    assert not blobs.exists(key) and blobs.exists(again)


def test_restore_refuses_to_overwrite_without_replace_and_replaces_with_it(data: Settings, tmp_path, capsys) -> None:
    before = read_all(data)
    out = tmp_path / "a.vlmrag.tar"
    assert main(["backup", str(out)]) == 0
    capsys.readouterr()
    assert main(["restore", str(out)]) == 1  # Conflict: the KBs hold snippets
    assert len(error_lines(capsys)) == 1
    assert served_versions(data)["default"] == ("vlmrag", ["vlmrag"])
    assert main(["restore", str(out), "--replace"]) == 0
    assert_same_content(read_all(data), before)
    assert served_versions(data)["default"] == ("vlmrag__v2", ["vlmrag__v2"])  # the replaced version dropped


def test_restore_one_kb_as_a_new_one(data: Settings, tmp_path: Path, capsys) -> None:
    before = read_all(data)
    out = tmp_path / "pumps.vlmrag.tar"
    assert main(["backup", str(out), "--kb", "pumps"]) == 0
    with ArchiveReader(out) as reader:
        assert set(reader.manifest["kbs"]) == {"pumps"}
    assert main(["restore", str(out), "--kb", "pumps", "--as", "pumps2"]) == 0
    from tests.support.backup_data import read_kb

    copy = asyncio.run(read_kb(data, "pumps2"))
    assert set(copy["points"]) == set(before["kbs"]["pumps"]["points"])
    assert copy["blobs"] == before["kbs"]["pumps"]["blobs"]
    capsys.readouterr()
    assert main(["kb", "list", "--json"]) == 0
    assert {"default", "pumps", "pumps2"} <= {k["name"] for k in json.loads(capsys.readouterr().out)}


# --- bad archives: one error line, nothing changed ----------------------------------------------------
def _rewrite(src: Path, dest: Path, change) -> None:  # type: ignore[no-untyped-def]
    """Copy archive ``src`` to ``dest``, passing each member's (name, bytes) through ``change``."""
    with tarfile.open(src) as tin, tarfile.open(dest, "w") as tout:
        for member in tin.getmembers():
            data = change(member.name, tin.extractfile(member).read())  # type: ignore[union-attr]
            info = tarfile.TarInfo(member.name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))


def _flip_byte(name: str, data: bytes) -> bytes:
    """One bit of a member of KB pumps: its shard's config (edge-shard) or its points (logical)."""
    if name in ("kbs/pumps/shard/edge_config.json", "kbs/pumps/points.jsonl"):
        return data[:10] + bytes([data[10] ^ 0x01]) + data[11:]
    return data


def _version_99(name: str, data: bytes) -> bytes:
    if name == "manifest.json":
        manifest = json.loads(data)
        manifest["format_version"] = 99
        return json.dumps(manifest).encode()
    return data


@pytest.mark.parametrize("damage", ["truncated", "corrupted", "corrupted_logical", "format_version", "not_a_tar",
                                    "missing_member"])
def test_bad_archives_change_nothing(data: Settings, tmp_path: Path, capsys, damage: str) -> None:
    good = tmp_path / "good.vlmrag.tar"
    assert main(["backup", str(good), *(["--format", "logical"] if damage == "corrupted_logical" else [])]) == 0
    with ArchiveReader(good) as reader:
        assert reader.manifest["kbs"]["pumps"]["method"] == ("logical" if damage == "corrupted_logical"
                                                            else "edge-shard")
    bad = tmp_path / "bad.vlmrag.tar"
    if damage == "truncated":
        bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif damage in ("corrupted", "corrupted_logical"):
        _rewrite(good, bad, _flip_byte)
    elif damage == "format_version":
        _rewrite(good, bad, _version_99)
    elif damage == "not_a_tar":
        bad.write_bytes(b"hello, not an archive\n" * 100)
    else:
        with tarfile.open(good) as tin, tarfile.open(bad, "w") as tout:
            for member in tin.getmembers():
                if "/blobs/" not in member.name or "pumps" not in member.name:
                    tout.addfile(member, tin.extractfile(member))
    before, versions = read_all(data), served_versions(data)
    capsys.readouterr()
    code = main(["restore", str(bad), "--replace"])
    lines = error_lines(capsys)
    assert code == 2 and len(lines) == 1, lines
    assert {"truncated": "truncated", "corrupted": "corrupted", "corrupted_logical": "corrupted",
            "format_version": "format version 99",
            "not_a_tar": "not a", "missing_member": "truncated"}[damage] in lines[0]
    assert "nothing was changed" in lines[0]
    assert served_versions(data) == versions
    assert_same_content(read_all(data), before)


def test_wrong_embedder_is_refused(data: Settings, tmp_path: Path, capsys, monkeypatch) -> None:
    from tests.support.tiny_clip import write_tiny_clip_config

    out = tmp_path / "a.vlmrag.tar"
    assert main(["backup", str(out)]) == 0
    before, versions = read_all(data), served_versions(data)
    other = write_tiny_clip_config(tmp_path / "other", name="other-tiny-clip")
    monkeypatch.setenv("VLMRAG_CLIP_MODEL", str(other))
    capsys.readouterr()
    assert main(["restore", str(out), "--replace"]) == 1
    lines = error_lines(capsys)
    assert len(lines) == 1 and "other-tiny-clip" in lines[0] and "--reembed" in lines[0], lines
    monkeypatch.undo()
    assert served_versions(data) == versions
    assert_same_content(read_all(data), before)


@pytest.mark.parametrize("fmt", ["auto", "logical"])
def test_reembed_restores_an_archive_of_another_model(data: Settings, tmp_path: Path, capsys, monkeypatch,
                                                      fmt: str) -> None:
    """--reembed: the points get vectors of the configured (other) tiny CLIP from their text and blobs."""
    from tests.support.tiny_clip import write_tiny_clip_config

    before = read_all(data)
    out = tmp_path / "a.vlmrag.tar"
    assert main(["backup", str(out), "--format", fmt]) == 0
    other = write_tiny_clip_config(tmp_path / "other", name="other-tiny-clip")
    monkeypatch.setenv("VLMRAG_CLIP_MODEL", str(other))
    shutil.rmtree(data.data_dir)
    capsys.readouterr()
    assert main(["restore", str(out), "--reembed", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert all(item["reembedded"] for item in result["restored"])
    after = read_all(bare_settings())
    assert after["rows"] == before["rows"]
    for name, kb in before["kbs"].items():
        got = after["kbs"][name]
        assert "other-tiny-clip" in got["embedder"] and got["embedder"] != kb["embedder"]
        assert set(got["points"]) == set(kb["points"]) and got["blobs"] == kb["blobs"]
        for pid, point in kb["points"].items():
            mine = got["points"][pid]
            assert mine["payload"] == point["payload"] and mine["lexical"] == point["lexical"]
            # an image vector where there is an image, a text vector where there is text (both tiny configs
            # have the same architecture and seed, so the same weights: only the identity tells them apart)
            assert set(mine["vectors"]) == set(point["vectors"])
    # the new model restored with its own id: a plain restore of the same archive is now the mismatch
    capsys.readouterr()
    assert main(["restore", str(out), "--replace"]) == 1
    assert "--reembed" in error_lines(capsys)[0]


# --- kill -9 --------------------------------------------------------------------------------------------
_KILL_AFTER = """
import os, signal, sys
from {module} import {cls} as target
original = target.{method}
calls = 0
def wrapped(*args, **kwargs):
    global calls
    calls += 1
    if calls > {after}:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
target.{method} = wrapped
from server.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _killed_child(module: str, cls: str, method: str, after: int, *argv: str) -> subprocess.CompletedProcess[str]:
    """``vlmrag ARGV`` in a child process that SIGKILLs itself after ``after`` calls of ``cls.method``."""
    code = _KILL_AFTER.format(module=module, cls=cls, method=method, after=after)
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)


def test_kill_mid_backup_leaves_no_archive_and_the_previous_one_intact(data: Settings, tmp_path: Path) -> None:
    previous = tmp_path / "nightly.vlmrag.tar"
    assert main(["backup", str(previous)]) == 0
    old_bytes = previous.read_bytes()
    new = tmp_path / "other.vlmrag.tar"
    for target in (previous, new):  # over the previous archive's name, and under a new name
        done = _killed_child("retriever.backup.archive", "ArchiveWriter", "record", 5, "backup", str(target))
        assert done.returncode == -signal.SIGKILL, done.stderr
    assert not new.exists()
    assert previous.read_bytes() == old_bytes
    with ArchiveReader(previous) as reader:
        reader.verify()
    assert len(list(tmp_path.glob(".*.partial-*"))) == 2  # the killed runs' temporary files, nothing else
    before = read_all(data)
    shutil.rmtree(data.data_dir)
    assert main(["restore", str(previous)]) == 0
    assert_same_content(read_all(data), before)


@pytest.mark.parametrize("kill", ["shard_files", "before_switch", "logical"])
def test_kill_mid_restore_leaves_the_served_kb_and_the_next_restore_works(data: Settings, tmp_path: Path,
                                                                          kill: str) -> None:
    """Killed while the shard files are extracted, after they are a version but before the switch, or
    (logical format) while points are imported."""
    out = tmp_path / "a.vlmrag.tar"
    assert main(["backup", str(out), *(["--format", "logical"] if kill == "logical" else [])]) == 0
    archived = read_all(data)
    # the served KB changes after the backup: the killed restore must not take this away
    from tests.support.backup_data import read_kb

    asyncio.run(_delete_one(data))
    before, versions = read_all(data), served_versions(data)
    where = {"shard_files": ("retriever.backup.archive", "ArchiveReader", "extract", 3),
             "before_switch": ("retriever.reindex", "EdgeVersions", "switch", 0),
             "logical": ("retriever.store.edge", "EdgeStore", "import_points", 0)}[kill]
    done = _killed_child(*where, "restore", str(out), "--replace")
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert served_versions(data)["default"][0] == versions["default"][0]
    assert_same_content(read_all(data), before)
    assert len(asyncio.run(read_kb(data, "default"))["points"]) == 5
    assert main(["restore", str(out), "--replace"]) == 0
    assert_same_content(read_all(data), archived)


async def _delete_one(settings: Settings) -> None:
    from server.wiring import build_knowledge_base

    kb = await build_knowledge_base(settings, load_model=False)
    try:
        page, _ = await kb.list_snippets(10)
        text_only = next(p for p in page if not p.payload.image_ref)
        await kb.delete(text_only.id)
    finally:
        await kb.close()


# --- consistency while ingesting ---------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["auto", "logical"])
async def test_backup_during_ingestion_is_one_moment(settings: Settings, knowledge_base, tmp_path: Path,
                                                     fmt: str) -> None:
    """Every archived point's blobs are in the archive, and its points are the first N ingested: one moment."""
    from retriever.backup.collection import point_blobs
    from retriever.backup.shard import archived_points
    from server.knowledge_bases import KBCatalog, KnowledgeBases, database_url
    from server.services.backups import BackupService
    from tests.support.fixtures_retriever import make_sample_images
    from tests.support.media import png_bytes

    images = [png_bytes(im) for im in make_sample_images(60, size=48)]
    order: list[str] = []

    async def ingest() -> None:
        for i, image in enumerate(images):
            snippet_id, _ = await knowledge_base.add_snippet(image, f"part {i}", f"parts/{i}.png")
            order.append(snippet_id)

    async def no_open(collection: str, namespace: str):  # type: ignore[no-untyped-def]
        raise AssertionError("only the default KB")

    kbs = KnowledgeBases(settings, KBCatalog(database_url(settings)), no_open, default=knowledge_base)
    service = BackupService(settings, kbs)
    writer = asyncio.create_task(ingest())
    while len(order) < 10:
        await asyncio.sleep(0.01)
    out = tmp_path / "during.vlmrag.tar"
    summary = await service.backup(out, fmt=fmt)
    during = len(order)
    await writer
    kbs.catalog.close()
    assert summary["kbs"]["default"]["method"] == ("edge-shard" if fmt == "auto" else "logical")
    assert 10 <= summary["kbs"]["default"]["points"] < len(images), "the backup did not overlap the ingestion"
    with ArchiveReader(out) as reader:
        reader.verify()
        points = [p async for batch in archived_points(reader, "default", tmp_path / "scratch") for p in batch]
        members = set(reader.members)
    ids = [p.id for p in points]
    for point in points:
        assert point.vectors and set(point.vectors) <= {"image", "text"}
        for key in point_blobs(point.payload.to_dict()):
            assert f"kbs/default/blobs/{key}" in members
    count = len(ids)
    assert count == summary["kbs"]["default"]["points"] and count <= during
    assert set(ids) == set(order[:count])  # exactly the points stored up to one moment
    assert not list((tmp_path / "scratch").glob("*"))  # the extracted shard removed


# --- incremental, migration, PostgreSQL ----------------------------------------------------------------
def test_incremental_backup_restores_with_its_base(data: Settings, tmp_path: Path, capsys) -> None:
    from tests.support.backup_data import add_snippet

    full = tmp_path / "full.vlmrag.tar"
    assert main(["backup", str(full)]) == 0
    asyncio.run(add_snippet(data))
    after = read_all(data)
    incremental = tmp_path / "incr.vlmrag.tar"
    capsys.readouterr()
    assert main(["backup", str(incremental), "--incremental", str(full), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kind"] == "incremental" and summary["base"] == full.name
    assert summary["kbs"]["default"]["blobs"] == 2 and summary["kbs"]["pumps"]["blobs"] == 0
    assert incremental.stat().st_size < full.stat().st_size
    shutil.rmtree(data.data_dir)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.move(incremental, moved / incremental.name)
    assert main(["restore", str(moved / incremental.name)]) == 2  # its base is not beside it
    lines = error_lines(capsys)
    assert len(lines) == 1 and "base" in lines[0]
    assert main(["restore", str(moved / incremental.name), "--base", str(full)]) == 0
    assert_same_content(read_all(data), after)


def test_edge_to_qdrant_client_and_back(data: Settings, tmp_path: Path, monkeypatch) -> None:
    """The migration path: embedded store -> a Qdrant (qdrant-client local mode stands in) -> embedded."""
    before = read_all(data)
    from_edge = tmp_path / "edge.vlmrag.tar"
    assert main(["backup", str(from_edge)]) == 0
    monkeypatch.setenv("VLMRAG_QDRANT_URL", f"local:{tmp_path / 'qdrant-server'}")
    assert main(["restore", str(from_edge)]) == 0
    assert_same_content(read_all(bare_settings()), before)
    # local mode opens a folder once per process, so one KB per archive here (a Qdrant server has no such limit)
    archives = [tmp_path / f"server-{kb}.vlmrag.tar" for kb in ("default", "pumps")]
    for archive, kb in zip(archives, ("default", "pumps")):
        assert main(["backup", str(archive), "--kb", kb]) == 0
    monkeypatch.delenv("VLMRAG_QDRANT_URL")
    shutil.rmtree(data.data_dir)
    for archive in archives:
        assert main(["restore", str(archive)]) == 0
    assert_same_content(read_all(data), before)


def test_rows_dumped_from_postgresql_restore_into_sqlite(cli_env: Path, embedder: ClipEmbedder, postgres_url: str,
                                                         tmp_path: Path, monkeypatch) -> None:
    import uuid

    import sqlalchemy as sa

    name = f"backup_{uuid.uuid4().hex[:8]}"  # a database of its own: other tests share the server
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    admin.dispose()
    monkeypatch.setenv("VLMRAG_DATABASE_URL", postgres_url.rsplit("/", 1)[0] + f"/{name}")
    settings = bare_settings()
    asyncio.run(populate(settings, embedder))
    before = read_all(settings)
    assert before["rows"]["answers"] and before["rows"]["feedback"]
    out = tmp_path / "pg.vlmrag.tar"
    assert main(["backup", str(out)]) == 0
    monkeypatch.delenv("VLMRAG_DATABASE_URL")
    shutil.rmtree(settings.data_dir)
    assert main(["restore", str(out)]) == 0
    after = bare_settings()
    assert after.database_url == ""  # SQLite under the data dir now
    assert_same_content(read_all(after), before)
