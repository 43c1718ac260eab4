"""``POST /v1/admin/backup``, ``GET /v1/admin/backups`` and the schedule inside the server (real app, real store)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from retriever.backup import ArchiveReader
from server.app import create_app
from server.auth import hash_key
from server.settings import Settings
from tests.support.fake_vllm import FakeVLLM
from tests.support.fixtures_server import ingest_samples, running_client

ADMIN, BOUND_ADMIN, CHAT = "sk-admin-all", "sk-admin-pumps", "sk-chat"
KEYS = ",".join([f"admin:sha256:{hash_key(ADMIN)}", f"admin@pumps,default:sha256:{hash_key(BOUND_ADMIN)}",
                 f"chat:sha256:{hash_key(CHAT)}"])


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _app(settings: Settings, knowledge_base, fake_vllm: FakeVLLM, **overrides):  # type: ignore[no-untyped-def]
    changed = settings.model_copy(update={"auth_disabled": False, "api_keys": KEYS, **overrides})
    return create_app(changed, knowledge_base=knowledge_base, vllm_transport=httpx.MockTransport(fake_vllm))


async def test_backup_through_the_api(settings: Settings, knowledge_base, fake_vllm: FakeVLLM, tmp_path: Path) -> None:
    ids = await ingest_samples(knowledge_base)
    folder = tmp_path / "backups"
    async with running_client(_app(settings, knowledge_base, fake_vllm, backup_dir=str(folder))) as client:
        for key, status in ((CHAT, 403), (BOUND_ADMIN, 403)):
            r = await client.post("/v1/admin/backup", json={}, headers=auth(key))
            assert r.status_code == status, r.text
            assert (await client.get("/v1/admin/backups", headers=auth(key))).status_code == status
        r = await client.post("/v1/admin/backup", json={"kb": "nope"}, headers=auth(ADMIN))
        assert r.status_code == 404
        r = await client.post("/v1/admin/backup", json={}, headers=auth(ADMIN))
        assert r.status_code == 201, r.text
        full = r.json()
        assert full["kind"] == "full" and full["kbs"]["default"]["points"] == len(ids)
        assert full["kbs"]["default"]["method"] == "edge-shard" and full["format_version"] == 2
        assert Path(full["path"]).parent == folder
        # a new snippet, then an incremental backup: only its blobs are in it
        from tests.support.fixtures_retriever import make_sample_images
        from tests.support.media import png_bytes

        await knowledge_base.add_snippet(png_bytes(make_sample_images(6)[5]), "one more", "more.png")
        r = await client.post("/v1/admin/backup", json={"incremental": full["name"]}, headers=auth(ADMIN))
        assert r.status_code == 201, r.text
        incremental = r.json()
        assert incremental["kind"] == "incremental" and incremental["base"] == full["name"]
        assert incremental["kbs"]["default"]["points"] == len(ids) + 1
        assert incremental["kbs"]["default"]["blobs"] == 2  # the new image and its thumbnail
        assert incremental["kbs"]["default"]["blobs_in_base"] == full["kbs"]["default"]["blobs"]
        assert (await client.post("/v1/admin/backup", json={"incremental": "missing.vlmrag.tar"},
                                  headers=auth(ADMIN))).status_code == 404
        r = await client.post("/v1/admin/backup", json={"format": "logical"}, headers=auth(ADMIN))
        assert r.status_code == 201 and r.json()["kbs"]["default"]["method"] == "logical", r.text
        logical = r.json()
        assert (await client.post("/v1/admin/backup", json={"format": "zip"}, headers=auth(ADMIN))).status_code == 400
        r = await client.get("/v1/admin/backups", headers=auth(ADMIN))
        assert r.status_code == 200
        assert [i["name"] for i in r.json()["items"]] == [logical["name"], incremental["name"], full["name"]]
        assert r.json()["schedule"] is None
    with ArchiveReader(Path(incremental["path"])) as reader:
        reader.verify()


async def test_backup_without_a_folder_is_a_clear_400(settings: Settings, knowledge_base, fake_vllm) -> None:
    async with running_client(_app(settings, knowledge_base, fake_vllm)) as client:
        r = await client.post("/v1/admin/backup", json={}, headers=auth(ADMIN))
        assert r.status_code == 400 and "VLMRAG_BACKUP_DIR" in r.json()["error"]["message"]


async def test_the_schedule_backs_up_and_keeps_the_last_n(settings: Settings, knowledge_base, fake_vllm,
                                                          tmp_path: Path) -> None:
    await ingest_samples(knowledge_base)
    folder = tmp_path / "scheduled"
    app = _app(settings, knowledge_base, fake_vllm, backup_dir=str(folder), backup_interval_s=0.2, backup_keep=2)
    async with running_client(app) as client:
        written: set[str] = set()
        for _ in range(300):
            await asyncio.sleep(0.05)
            last = app.state.vlmrag.backup_schedule.last
            if last:
                written.add(last["name"])
            if len(written) >= 4:
                break
        assert len(written) >= 4, "the schedule did not run"
        await asyncio.sleep(0.3)
        listed = (await client.get("/v1/admin/backups", headers=auth(ADMIN))).json()
    assert listed["schedule"]["keep"] == 2 and listed["schedule"]["last_error"] is None
    assert 2 <= len(listed["items"]) <= 3  # the last 2, and one more if it was listed before its pruning
    names = sorted(p.name for p in folder.glob("*.vlmrag.tar"))
    assert 2 <= len(names) <= 3  # 3: stopped between a backup and its pruning
    assert min(written) not in names  # the oldest were removed
    assert not list(folder.glob(".*partial*"))  # a backup cut short by the shutdown removed its temporary file
