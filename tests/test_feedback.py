"""Answer feedback: the answer log, POST/GET /v1/feedback and ``vlmrag feedback export``.

API tier: real knowledge base (embedded Qdrant, tiny CLIP), scripted vLLM, keys on. Ratings survive an app
restart on the same data dir; only the key that received an answer may rate it (any other id is a 404);
the exports parse back to the same records; a failing or hanging database never fails a chat.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.app import create_app
from server.auth import hash_key
from server.commands.feedback import CSV_COLUMNS, CSV_JSON_COLUMNS
from server.feedback import AnswerLog, AnswerRecord, decode_cursor, feedback_database_url
from server.settings import Settings
from tests.support.fake_vllm import FakeVLLM
from tests.support.fixtures_server import ingest_samples, running_client
from tests.support.media import sse_payloads

CHAT_A = "chat-key-a-0123456789abcdef"
CHAT_B = "chat-key-b-0123456789abcdef"
ADMIN = "admin-key-0123456789abcdef"
PUMPS_ADMIN = "admin-key-pumps-0123456789ab"
KEYS = ",".join([f"chat:sha256:{hash_key(CHAT_A)}", f"chat:{CHAT_B}", f"admin:sha256:{hash_key(ADMIN)}",
                 f"admin@pumps:sha256:{hash_key(PUMPS_ADMIN)}"])

App = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def ask(text: str, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], **extra}


@pytest.fixture
async def ids(knowledge_base) -> list[str]:
    return await ingest_samples(knowledge_base)


@pytest.fixture
def keyed(settings: Settings, knowledge_base, fake_vllm: FakeVLLM) -> App:
    """``async with keyed(**overrides) as client``: the app with API keys on, over the test's data dir."""

    @asynccontextmanager
    async def open_app(**overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
        changed = settings.model_copy(update={"auth_disabled": False, "api_keys": KEYS, **overrides})
        app = create_app(changed, knowledge_base=knowledge_base, vllm_transport=httpx.MockTransport(fake_vllm))
        async with running_client(app) as client:
            client.app = app  # type: ignore[attr-defined]
            yield client

    return open_app


async def chat(client: httpx.AsyncClient, key: str, text: str, **extra: Any) -> dict[str, Any]:
    r = await client.post("/v1/chat/completions", headers=auth(key), json=ask(text, **extra))
    assert r.status_code == 200, r.text
    return r.json()


async def rate(client: httpx.AsyncClient, key: str, completion_id: str, rating: str = "down",
               **extra: Any) -> httpx.Response:
    return await client.post("/v1/feedback", headers=auth(key),
                             json={"completion_id": completion_id, "rating": rating, **extra})


# --- storing and reading ratings -----------------------------------------------------------------
async def test_rating_is_stored_with_the_answer_and_survives_a_restart(keyed: App, ids, fake_vllm) -> None:
    async with keyed() as client:
        answer = await chat(client, CHAT_A, "how long is the bike warranty?", temperature=0.3)
        kept = [s for s in answer["sources"] if s["kept"]]
        r = await rate(client, CHAT_A, answer["id"], "down", comment="it missed the frame warranty",
                       snippet_ids=[kept[0]["id"]])
        assert r.status_code == 201, r.text
        stored = r.json()
        assert stored["rating"] == "down" and stored["kb"] == "default"
        assert stored["key_id"] == "key:" + hash_key(CHAT_A)[:12]

        streamed = await client.post("/v1/chat/completions", headers=auth(CHAT_A),
                                     json=ask("green stripes?", stream=True))
        chunks = sse_payloads(streamed.text)
        assert len({c["id"] for c in chunks}) == 1  # the page rates with the chunks' id
        r = await rate(client, CHAT_A, chunks[0]["id"], "up")
        assert r.status_code == 201, r.text
        assert r.json()["answer"]["answer"] == fake_vllm.answer  # the streamed text was logged whole

    async with keyed() as client:  # a new app over the same data dir
        r = await client.get("/v1/feedback", headers=auth(ADMIN))
        assert r.status_code == 200, r.text
        items = {i["completion_id"]: i for i in r.json()["items"]}
        assert set(items) == {answer["id"], chunks[0]["id"]}
        item = items[answer["id"]]
        assert (item["rating"], item["comment"], item["snippet_ids"]) == ("down", "it missed the frame warranty",
                                                                         [kept[0]["id"]])
        logged = item["answer"]
        assert logged["question"] == "how long is the bike warranty?" and logged["kb"] == "default"
        assert logged["search_query"] == answer["search_query"] and logged["model"] == "vlmrag"
        assert logged["answer"] == fake_vllm.answer
        assert [(s["id"], s["kept"], s["index"]) for s in logged["sources"]] == \
            [(s["id"], s["kept"], s["index"]) for s in answer["sources"]]
        assert all(s["clip_score"] is not None for s in logged["sources"])
        plan = logged["settings"]
        assert plan["k"] == 3 and plan["scorer"] == "clip" and plan["query"] == "recent"
        assert plan["answer_model"] == "tiny-vlm" and plan["request"]["temperature"] == 0.3

        r = await rate(client, CHAT_A, answer["id"], "up")  # rating again replaces the rating
        assert r.status_code == 201 and r.json()["comment"] is None
        ratings = [i["rating"] for i in (await client.get("/v1/feedback", headers=auth(ADMIN))).json()["items"]]
        assert sorted(ratings) == ["up", "up"]


async def test_ask_answers_carry_a_rateable_id(keyed: App, ids) -> None:
    async with keyed() as client:
        r = await client.post("/v1/ask", headers=auth(CHAT_A), data={"question": "bike warranty?"})
        assert r.status_code == 200, r.text
        rated = await rate(client, CHAT_A, r.json()["id"], "up")
        assert rated.status_code == 201, rated.text
        assert rated.json()["answer"]["question"] == "bike warranty?"


async def test_unknown_or_another_keys_completion_is_404(keyed: App, ids) -> None:
    async with keyed() as client:
        answer = await chat(client, CHAT_A, "bike warranty?")
        errors = []
        for key, completion_id in ((CHAT_B, answer["id"]), (ADMIN, answer["id"]), (CHAT_A, "chatcmpl-nope")):
            r = await rate(client, key, completion_id)
            assert r.status_code == 404, r.text
            assert "bike" not in r.text
            errors.append((r.json()["error"]["type"], r.json()["error"]["code"], r.json()["error"]["param"]))
        assert len(set(errors)) == 1  # a foreign id reads exactly like an unknown one
        assert (await rate(client, CHAT_A, answer["id"])).status_code == 201
        assert (await client.get("/v1/feedback", headers=auth(CHAT_A))).status_code == 403  # listing is admin
        assert (await rate(client, "not-a-key-0123456789", answer["id"])).status_code == 401


async def test_comment_length_snippet_ids_and_rating_are_checked(keyed: App, ids) -> None:
    async with keyed(limit_feedback_comment_chars=10) as client:
        answer = await chat(client, CHAT_A, "bike warranty?")
        r = await rate(client, CHAT_A, answer["id"], comment="x" * 11)
        assert r.status_code == 400 and r.json()["error"]["param"] == "comment", r.text
        assert "VLMRAG_LIMIT_FEEDBACK_COMMENT_CHARS" in r.json()["error"]["message"]
        r = await rate(client, CHAT_A, answer["id"], snippet_ids=["00000000-0000-0000-0000-000000000000"])
        assert r.status_code == 400 and r.json()["error"]["param"] == "snippet_ids", r.text
        r = await rate(client, CHAT_A, answer["id"], snippet_ids=[f"id-{i}" for i in range(65)])
        assert r.status_code == 400, r.text
        assert (await rate(client, CHAT_A, answer["id"], rating="meh")).status_code == 400
        r = await rate(client, CHAT_A, answer["id"], comment="x" * 10)
        assert r.status_code == 201, r.text


async def test_listing_filters_by_kb_since_and_rating_and_pages(keyed: App, ids) -> None:
    async with keyed() as client:
        r = await client.post("/v1/knowledge-bases", headers=auth(ADMIN), json={"name": "pumps"})
        assert r.status_code == 201, r.text
        rated: list[tuple[str, str, str]] = []  # (completion id, kb, rating), oldest first
        for i, (kb, rating) in enumerate([("default", "down"), ("pumps", "down"), ("default", "up"),
                                          ("default", "down"), ("pumps", "up")]):
            if i == 3:
                since = time.time()
            model = "vlmrag" if kb == "default" else f"vlmrag/{kb}"
            answer = await chat(client, ADMIN, f"question {i}", model=model)
            assert (await rate(client, ADMIN, answer["id"], rating)).status_code == 201
            rated.append((answer["id"], kb, rating))
            await asyncio.sleep(0.002)  # distinct rating times

        async def listed(key: str = ADMIN, **params: Any) -> list[str]:
            r = await client.get("/v1/feedback", headers=auth(key), params=params)
            assert r.status_code == 200, r.text
            return [i["completion_id"] for i in r.json()["items"]]

        newest = [c for c, _, _ in reversed(rated)]
        assert await listed() == newest
        assert await listed(kb="pumps") == [c for c, kb, _ in reversed(rated) if kb == "pumps"]
        assert await listed(rating="down") == [c for c, _, r in reversed(rated) if r == "down"]
        assert await listed(kb="default", rating="down") == [rated[3][0], rated[0][0]]
        assert await listed(since=since) == newest[:2]

        pages, cursor = [], None
        while True:
            r = await client.get("/v1/feedback", headers=auth(ADMIN),
                                 params={"limit": 2, **({"cursor": cursor} if cursor else {})})
            body = r.json()
            pages.append([i["completion_id"] for i in body["items"]])
            cursor = body["next_cursor"]
            if cursor is None:
                break
        assert pages == [newest[0:2], newest[2:4], newest[4:]]

        # an admin bound to pumps sees only pumps' ratings; asking for another KB is a 404
        assert await listed(PUMPS_ADMIN) == [c for c, kb, _ in reversed(rated) if kb == "pumps"]
        r = await client.get("/v1/feedback", headers=auth(PUMPS_ADMIN), params={"kb": "default"})
        assert r.status_code == 404, r.text
        r = await client.get("/v1/feedback", headers=auth(ADMIN), params={"cursor": "not-a-cursor"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "cursor"


# --- export --------------------------------------------------------------------------------------
def _from_csv(row: dict[str, str]) -> dict[str, Any]:
    """A CSV row back as the JSON-lines record it came from."""
    values: dict[str, Any] = {k: json.loads(v) if k in CSV_JSON_COLUMNS else v for k, v in row.items()}
    answer_keys = ("question", "answer", "search_query", "sources", "model", "settings", "verification")
    return {
        "completion_id": values["completion_id"], "kb": values["kb"], "key_id": values["key_id"],
        "rating": values["rating"], "comment": values["comment"] or None, "snippet_ids": values["snippet_ids"],
        "rated_at": float(values["rated_at"]),
        "answer": {"completion_id": values["completion_id"], "key_id": values["key_id"], "kb": values["kb"],
                   **{k: values[k] for k in answer_keys}, "search_query": values["search_query"] or None,
                   "created_at": float(values["answered_at"])},
    }


async def test_export_jsonl_and_csv_parse_back_to_the_same_records(
    keyed: App, ids, cli_env: Path, settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    from server.cli import main

    assert cli_env == settings.data_dir  # the CLI reads the database the app writes
    async with keyed() as client:
        for i, rating in enumerate(["down", "up", "down"]):
            answer = await chat(client, CHAT_A, f"question, \"quoted\"\nline {i} — ünïcode")
            comment = "a, b\n\"c\"" if i == 0 else None
            assert (await rate(client, CHAT_A, answer["id"], rating, comment=comment)).status_code == 201
        api = (await client.get("/v1/feedback", headers=auth(ADMIN))).json()["items"]

        # while the app still runs: SQLite (WAL) lets the CLI read
        out_jsonl, out_csv = tmp_path / "f.jsonl", tmp_path / "f.csv"
        assert main(["feedback", "export", "--kb", "default", "--format", "jsonl", "--output", str(out_jsonl)]) == 0
        assert main(["feedback", "export", "--format", "csv", "--output", str(out_csv)]) == 0
    records = [json.loads(line) for line in out_jsonl.read_text(encoding="utf-8").splitlines()]
    with out_csv.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
        rows = [_from_csv(r) for r in reader]
    assert len(records) == 3 and rows == records
    assert [r["completion_id"] for r in records] == [i["completion_id"] for i in api]
    assert records[2]["comment"] == "a, b\n\"c\"" and records[2]["answer"]["question"].endswith("line 0 — ünïcode")
    for record, item in zip(records, api):
        assert record["answer"]["sources"] == item["answer"]["sources"]
        assert record["answer"]["settings"] == item["answer"]["settings"]

    capsys.readouterr()
    assert main(["feedback", "export", "--rating", "up"]) == 0  # to stdout
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["rating"] for line in lines] == ["up"]
    assert main(["feedback", "export", "--kb", "pumps"]) == 0 and capsys.readouterr().out == ""
    assert main(["feedback", "export", "--since", "2999-01-01"]) == 0 and capsys.readouterr().out == ""
    assert main(["feedback", "export", "--since", "yesterday"]) == 2


# --- the answer goes out whatever the database does ----------------------------------------------
async def test_a_failing_database_does_not_fail_the_chat(keyed: App, ids, settings: Settings) -> None:
    async with keyed() as client:
        with sqlite3.connect(settings.data_dir / "feedback.sqlite3") as db:
            db.execute("DROP TABLE feedback")
            db.execute("DROP TABLE answers")
        answer = await chat(client, CHAT_A, "bike warranty?")
        assert answer["choices"][0]["message"]["content"]
        r = await client.post("/v1/chat/completions", headers=auth(CHAT_A), json=ask("stripes?", stream=True))
        assert r.status_code == 200 and "error" not in r.text and r.text.rstrip().endswith("[DONE]")
        r = await rate(client, CHAT_A, answer["id"])
        assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable", r.text
        metrics = (await client.get("/metrics")).text
        assert 'vlmrag_degraded_total{stage="answer_log"} 2.0' in metrics


async def test_a_hanging_database_does_not_hold_the_answer(keyed: App, ids) -> None:
    async with keyed(feedback_write_timeout_s=0.2) as client:
        state = client.app.state.vlmrag  # type: ignore[attr-defined]

        async def hang(record: AnswerRecord) -> None:
            await asyncio.sleep(30)

        state.answer_log.record = hang
        started = time.monotonic()
        await chat(client, CHAT_A, "bike warranty?")
        assert time.monotonic() - started < 10


# --- the log itself ------------------------------------------------------------------------------
async def test_unrated_answers_are_forgotten_after_the_retention(tmp_path: Path) -> None:
    log = AnswerLog(f"sqlite:///{tmp_path / 'f.sqlite3'}", retention_days=1)
    try:
        old = time.time() - 2 * 86400

        def answer(cid: str, at: float) -> AnswerRecord:
            return AnswerRecord(cid, "key:a", "default", "q", None, [], "vlmrag", {}, at)

        log._pruned_at = time.time()  # no pruning while the old answers go in
        await log.record(answer("old-unrated", old))
        await log.record(answer("old-rated", old))
        await log.add_feedback("old-rated", "key:a", "down")
        log._pruned_at = 0.0
        await log.record(answer("new", time.time()))  # prunes (at most hourly)
        assert await log.get_answer("old-unrated") is None
        assert await log.get_answer("old-rated") is not None and await log.get_answer("new") is not None
    finally:
        log.close()


def test_database_url_and_cursor(settings: Settings) -> None:
    assert feedback_database_url(settings).endswith("feedback.sqlite3")
    shared = settings.model_copy(update={"database_url": "postgresql+psycopg://db/vlmrag"})
    assert feedback_database_url(shared) == "postgresql+psycopg://db/vlmrag"
    own = shared.model_copy(update={"feedback_database_url": "sqlite:///x.db"})
    assert feedback_database_url(own) == "sqlite:///x.db"
    from server.feedback import encode_cursor

    assert decode_cursor(encode_cursor(1712.25, "chatcmpl-1")) == (1712.25, "chatcmpl-1")
    for bad in ("", "!!", "WzFd", encode_cursor(1.0, "x")[:-2], "W3RydWUsICJ4Il0"):
        with pytest.raises(Exception) as info:
            decode_cursor(bad)
        assert getattr(info.value, "param", None) == "cursor"


def test_csv_quotes_survive(tmp_path: Path) -> None:
    """csv_row writes what DictReader reads back (commas, quotes and newlines in free text)."""
    from server.commands.feedback import write_records
    from server.feedback import FeedbackRecord

    answer = AnswerRecord("c", "k", "default", 'a "q", b\nc', None, [{"id": "s", "kept": True}], "m", {"k": 1}, 1.5)
    out = io.StringIO()
    write_records([FeedbackRecord("c", "k", "default", "up", "x,\"y\"", ["s"], 2.5, answer)], "csv", out)
    row = next(csv.DictReader(io.StringIO(out.getvalue())))
    assert row["question"] == 'a "q", b\nc' and row["comment"] == 'x,"y"' and json.loads(row["sources"])[0]["kept"]
