"""The shared state on a real PostgreSQL: the KB catalog and the answer/feedback log.

The server the test tier starts itself (``tests/support/fixtures_postgres.py``). Several vlmrag
replicas share one database when they share a Qdrant server: a KB one creates is seen by the other,
and two first ratings of one answer from two processes at once leave one rating, no error.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from retriever.errors import Conflict, NotFound
from server.app import create_app
from server.feedback import AnswerLog, AnswerRecord
from server.knowledge_bases import KBCatalog, KBSpec
from server.settings import Settings
from tests.support.fake_vllm import FakeVLLM
from tests.support.fixtures_server import running_client

pytestmark = pytest.mark.subprocess

REPO = Path(__file__).resolve().parents[1]


def test_the_url_is_a_postgresql_server(postgres_url: str) -> None:
    engine = sa.create_engine(postgres_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("select version()")).scalar_one().startswith("PostgreSQL")
    finally:
        engine.dispose()


async def test_catalog_on_postgresql_is_shared_by_two_replicas(postgres_url: str) -> None:
    a, b = KBCatalog(postgres_url), KBCatalog(postgres_url)
    name = f"pg{uuid.uuid4().hex[:8]}"
    try:
        spec = KBSpec(name, display_name="Pumps", retrieval={"k": 3, "mode": "lexical"}, created_at=time.time())
        await a.insert(spec)
        seen = await b.get(name)
        assert seen is not None and seen.display_name == "Pumps" and seen.retrieval == {"k": 3, "mode": "lexical"}
        with pytest.raises(Conflict):
            await b.insert(KBSpec(name, created_at=time.time()))  # a duplicate from the other replica
        seen.display_name = "Pumps and valves"
        await b.replace(seen)
        assert (await a.get(name)).display_name == "Pumps and valves"  # type: ignore[union-attr]
        assert name in {s.name for s in await a.list()}
        await a.remove(name)
        assert await b.get(name) is None
    finally:
        a.close()
        b.close()


def _record(completion_id: str) -> AnswerRecord:
    return AnswerRecord(completion_id, "key:a", "default", "why E-417?", None,
                        [{"id": "s1", "kept": True}, {"id": "s2", "kept": False}], "vlmrag", {"k": 5}, time.time())


async def test_answer_log_on_postgresql(postgres_url: str) -> None:
    log = AnswerLog(postgres_url)
    try:
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        await log.record(_record(cid))
        got = await log.get_answer(cid)
        assert got is not None and got.question == "why E-417?" and got.sources[0]["id"] == "s1"
        rated = await log.add_feedback(cid, "key:a", "down", "wrong code", ["s1"])
        assert (rated.rating, rated.comment, rated.snippet_ids) == ("down", "wrong code", ["s1"])
        again = await log.add_feedback(cid, "key:a", "up")  # a second rating replaces the first
        assert again.rating == "up"
        with pytest.raises(NotFound):
            await log.add_feedback(cid, "key:b", "up")  # another key's answer reads like none
        page = await asyncio.to_thread(log.page, kb="default")
        assert [(r.completion_id, r.rating) for r in page.items if r.completion_id == cid] == [(cid, "up")]
    finally:
        log.close()


RATER = """
import asyncio, json, sys
from server.feedback import AnswerLog

async def main(url, cid, rating, start):
    log = AnswerLog(url)
    import time
    while time.time() < start:
        await asyncio.sleep(0.001)
    done = []
    for i in range(20):
        record = await log.add_feedback(cid, "key:a", rating, f"{rating} {i}")
        done.append(record.rating)
    log.close()
    print(json.dumps(done))

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])))
"""


def test_two_processes_rate_one_answer_at_once(postgres_url: str) -> None:
    log = AnswerLog(postgres_url)
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    try:
        asyncio.run(log.record(_record(cid)))
        start = time.time() + 3.0  # both processes past their imports before the first write
        procs = [subprocess.Popen([sys.executable, "-c", RATER, postgres_url, cid, rating, str(start)],
                                  cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for rating in ("up", "down")]
        outputs = [p.communicate(timeout=120) for p in procs]
        for proc, (out, err) in zip(procs, outputs):
            assert proc.returncode == 0, err[-2000:]
            assert len(json.loads(out)) == 20
        engine = sa.create_engine(postgres_url)
        try:
            with engine.connect() as conn:
                rows = conn.execute(sa.text("select rating, comment from feedback where completion_id = :c"),
                                    {"c": cid}).all()
        finally:
            engine.dispose()
        assert len(rows) == 1 and rows[0].rating in ("up", "down")
        assert rows[0].comment == f"{rows[0].rating} 19"  # the last write of one of them, whole
    finally:
        log.close()


async def test_two_apps_share_the_catalog_and_the_log(postgres_url: str, settings: Settings, tmp_path: Path,
                                                    fake_vllm: FakeVLLM) -> None:
    """Two vlmrag apps (replicas) on one PostgreSQL: a KB made through one is listed and deleted by the other."""
    name = f"pg{uuid.uuid4().hex[:8]}"
    one = settings.model_copy(update={"database_url": postgres_url, "data_dir": tmp_path / "one"})
    two = settings.model_copy(update={"database_url": postgres_url, "data_dir": tmp_path / "two"})
    apps = [create_app(s, vllm_transport=httpx.MockTransport(fake_vllm)) for s in (one, two)]
    async with running_client(apps[0]) as a, running_client(apps[1]) as b:
        r = await a.post("/v1/knowledge-bases", json={"name": name, "display_name": "Shared"})
        assert r.status_code == 201, r.text
        listed = (await b.get("/v1/knowledge-bases")).json()
        assert name in json.dumps(listed)
        r = await b.delete(f"/v1/knowledge-bases/{name}")
        assert r.status_code == 200, r.text
        assert name not in json.dumps((await a.get("/v1/knowledge-bases")).json())
