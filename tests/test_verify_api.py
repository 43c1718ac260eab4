"""Answers checked against their sources through the API: chat (plain and streamed), ask, POST /v1/verify.

API tier: real knowledge base (embedded Qdrant, tiny CLIP), scripted vLLM (exact answers, failures on
demand), keys on. The manual page is the one snippet a source filter keeps, so ``[1]`` is known.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from server.app import create_app
from server.feedback import AnswerLog, AnswerRecord, feedback_database_url
from server.settings import Settings
from tests.support.fake_vllm import FakeVLLM
from tests.support.fixtures_server import running_client
from tests.support.media import sse_payloads

CHAT_A = "chat-key-a-verify-0123456789"
CHAT_B = "chat-key-b-verify-0123456789"
PUMPS_CHAT = "chat-key-pumps-verify-0123456"
ADMIN = "admin-key-verify-0123456789"
KEYS = f"chat:{CHAT_A},chat:{CHAT_B},chat@pumps:{PUMPS_CHAT},admin:{ADMIN}"
MANUAL = ("E-417: pump overheat. Switch off for 2 min and check the pump vents. "
          "If it persists, replace module QX-7731 (firmware v2.3.1 or later).")
WRONG = "Error E-471 means the pump overheated [1]. Switch off for 2 min [1]. Then replace QX-7731 [1]."
RIGHT = "Error E-417 means the pump overheated [1]. Switch off for 2 min [1]."
ONLY_MANUAL = {"filters": {"source": "manual.txt"}, "k": 1, "threshold": 0}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def ask(text: str = "what does E-417 mean?", **retrieval: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], "retrieval": {**ONLY_MANUAL, **retrieval}}


@pytest.fixture
async def served(settings: Settings, knowledge_base, fake_vllm: FakeVLLM) -> AsyncIterator[dict[str, Any]]:
    changed = settings.model_copy(update={"auth_disabled": False, "api_keys": KEYS, "verify_timeout_s": 2.0})
    app = create_app(changed, knowledge_base=knowledge_base, vllm_transport=httpx.MockTransport(fake_vllm))
    async with running_client(app) as client:
        r = await client.post("/v1/snippets", headers=auth(ADMIN), data={"text": MANUAL, "source": "manual.txt"})
        assert r.status_code == 201, r.text
        r = await client.post("/v1/knowledge-bases", headers=auth(ADMIN), json={"name": "pumps"})
        assert r.status_code == 201, r.text
        other = await client.post("/v1/snippets", params={"kb": "pumps"}, headers=auth(ADMIN),
                                  data={"text": "Pumps: E-471 is a dry run.", "source": "pumps.txt"})
        assert other.status_code == 201, other.text
        yield {"client": client, "app": app, "pumps_id": other.json()["id"]}


async def manual_id(client: httpx.AsyncClient) -> str:
    items = (await client.get("/v1/snippets", headers=auth(ADMIN))).json()["items"]
    return next(i["id"] for i in items if i["source"] == "manual.txt")


async def test_a_swapped_code_is_flagged_in_the_answer_and_logged(served, fake_vllm: FakeVLLM) -> None:
    client = served["client"]
    fake_vllm.answer = WRONG
    r = await client.post("/v1/chat/completions", headers=auth(CHAT_A), json=ask())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"]["content"] == WRONG  # flag (default): the answer is unchanged
    v = body["verification"]
    assert v["mode"] == "lexical" and v["disclaimed"] is False
    assert [(c["text"], c["cites"], c["supported"], c["unsupported"]) for c in v["claims"]] == [
        ("Error E-471 means the pump overheated [1].", [1], False, ["E-471"]),
        ("Switch off for 2 min [1].", [1], True, []),
        ("Then replace QX-7731 [1].", [1], True, []),
    ]
    assert v["supported_ratio"] == pytest.approx(2 / 3, abs=1e-3)
    wrong = next(t for t in v["claims"][0]["checked"] if t["supported"] is False)
    assert WRONG[wrong["start"]:wrong["end"]] == "E-471"
    assert "verify" in body["timings"]

    state = served["app"].state.vlmrag
    record = await state.answer_log.get_answer(body["id"])
    assert record.verification == v  # stored beside the feedback, as it went out
    metrics = (await client.get("/metrics")).text
    assert 'vlmrag_verify_claims_total{mode="lexical",verdict="unsupported"} 1.0' in metrics
    assert 'vlmrag_verify_answers_total{mode="lexical",outcome="flagged",source="chat"} 1.0' in metrics


async def test_disclaim_appends_the_sentence_as_one_more_delta_before_the_final_chunk(
    served, fake_vllm: FakeVLLM, settings: Settings,
) -> None:
    client = served["client"]
    fake_vllm.answer = WRONG
    r = await client.post("/v1/chat/completions", headers=auth(CHAT_A),
                          json={**ask(on_unsupported="disclaim"), "stream": True})
    assert r.status_code == 200, r.text
    chunks = sse_payloads(r.text)
    final = chunks[-1]
    assert final["choices"] == [] and final["verification"]["disclaimed"] is True
    assert [c["supported"] for c in final["verification"]["claims"]] == [False, True, True]
    disclaimer = chunks[-2]["choices"][0]["delta"]["content"]
    assert disclaimer == "\n\n" + settings.verify_disclaimer
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == WRONG + disclaimer
    record = await served["app"].state.vlmrag.answer_log.get_answer(final["id"])
    assert record.answer == text and record.verification["disclaimed"] is True

    fake_vllm.answer = RIGHT  # nothing unsupported: nothing appended
    r = await client.post("/v1/chat/completions", headers=auth(CHAT_A), json=ask(on_unsupported="disclaim"))
    assert r.json()["choices"][0]["message"]["content"] == RIGHT
    assert r.json()["verification"]["supported_ratio"] == 1.0


async def test_off_and_no_retrieval_give_no_verification(served, fake_vllm: FakeVLLM) -> None:
    client = served["client"]
    fake_vllm.answer = WRONG
    off = await client.post("/v1/chat/completions", headers=auth(CHAT_A), json=ask(verify="off"))
    assert off.status_code == 200 and off.json()["verification"] is None
    proxy = await client.post("/v1/chat/completions", headers=auth(CHAT_A),
                              json={"messages": [{"role": "user", "content": "hi"}], "retrieval": {"enabled": False}})
    assert proxy.json()["verification"] is None
    asked = await client.post("/v1/ask", headers=auth(CHAT_A),
                              data={"question": "E-417?", "source": "manual.txt", "k": "1", "threshold": "0",
                                    "on_unsupported": "disclaim"})
    assert asked.status_code == 200, asked.text
    assert asked.json()["verification"]["claims"][0]["unsupported"] == ["E-471"]
    assert asked.json()["answer"].startswith(WRONG + "\n\n")


async def test_model_check_scores_each_claim_and_a_failing_model_degrades(served, fake_vllm: FakeVLLM) -> None:
    client = served["client"]
    fake_vllm.answer = WRONG
    fake_vllm.yes_logprob = math.log(0.8)
    r = await client.post("/v1/chat/completions", headers=auth(CHAT_A), json=ask(verify="model"))
    v = r.json()["verification"]
    assert v["mode"] == "model" and r.json()["degraded"] == []
    assert [c["score"] for c in v["claims"]] == [pytest.approx(0.8, abs=1e-3)] * 3
    assert [c["supported"] for c in v["claims"]] == [False, True, True]  # E-471 stays unsupported
    judged = [b for b in fake_vllm.chat_bodies if b.get("logprobs") and "<sentence>" in str(b["messages"])]
    assert len(judged) == 3 and all(MANUAL[:20] in str(b["messages"]) for b in judged)

    fake_vllm.yes_logprob = math.log(0.2)  # the model says no: supported false
    r = await client.post("/v1/chat/completions", headers=auth(CHAT_A), json=ask(verify="model"))
    assert [c["supported"] for c in r.json()["verification"]["claims"]] == [False, False, False]

    fake_vllm.rerank_failures = [httpx.ConnectError("down")] * 12  # every judging request fails
    r = await client.post("/v1/chat/completions", headers=auth(CHAT_A), json=ask(verify="model"))
    assert r.status_code == 200, r.text
    assert "verify" in r.json()["degraded"]
    v = r.json()["verification"]
    assert [c["supported"] for c in v["claims"]] == [False, None, None] and v["claims"][1]["score"] is None


async def test_post_verify_with_snippet_ids(served) -> None:
    client = served["client"]
    ident = await manual_id(client)
    r = await client.post("/v1/verify", headers=auth(CHAT_A), json={"answer": WRONG, "snippet_ids": [ident]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["unsupported"] for c in body["claims"]] == [["E-471"], [], []]
    assert body["degraded"] == [] and "verify" in body["timings"]
    cites_missing = await client.post("/v1/verify", headers=auth(CHAT_A),
                                      json={"answer": "See QX-7731 [2].", "snippet_ids": [ident]})
    assert cites_missing.json()["claims"][0]["unsupported"] == ["[2]"]


@pytest.mark.parametrize(("key", "kb", "which", "status"), [
    (CHAT_A, None, "pumps_id", 404),  # another KB's snippet, asked in the default KB
    (CHAT_A, "pumps", "pumps_id", 200),  # the same one in its own KB
    (PUMPS_CHAT, "default", "pumps_id", 404),  # a KB this key is not bound to
    (PUMPS_CHAT, None, "manual", 404),  # bound to pumps: the default KB's snippet is unknown there
    (CHAT_A, None, "unknown", 404),
])
async def test_post_verify_tenancy(served, key: str, kb: str | None, which: str, status: int) -> None:
    client = served["client"]
    ids = {"pumps_id": served["pumps_id"], "manual": await manual_id(client),
           "unknown": "00000000-0000-0000-0000-000000000000"}
    r = await client.post("/v1/verify", headers=auth(key),
                          json={"answer": "E-471 [1].", "snippet_ids": [ids[which]], **({"kb": kb} if kb else {})})
    assert r.status_code == status, r.text
    if status == 404:  # the same answer as for an id that exists nowhere
        assert r.json()["error"]["code"] == "not_found", r.text


async def test_post_verify_by_completion_id_is_only_for_the_key_that_got_it(served, fake_vllm: FakeVLLM) -> None:
    client = served["client"]
    fake_vllm.answer = WRONG
    answer = (await client.post("/v1/chat/completions", headers=auth(CHAT_A), json=ask(verify="off"))).json()
    r = await client.post("/v1/verify", headers=auth(CHAT_A), json={"completion_id": answer["id"]})
    assert r.status_code == 200, r.text
    assert [c["unsupported"] for c in r.json()["claims"]] == [["E-471"], [], []]  # the logged answer
    fixed = await client.post("/v1/verify", headers=auth(CHAT_A), json={"completion_id": answer["id"], "answer": RIGHT})
    assert fixed.json()["supported_ratio"] == 1.0
    for key, extra in ((CHAT_B, {}), (CHAT_A, {"kb": "pumps"})):
        r = await client.post("/v1/verify", headers=auth(key), json={"completion_id": answer["id"], **extra})
        assert r.status_code == 404, r.text
    r = await client.post("/v1/verify", headers=auth(CHAT_A), json={"completion_id": "chatcmpl-nope"})
    assert r.status_code == 404


async def test_post_verify_bad_input(served, settings: Settings) -> None:
    client = served["client"]
    ident = await manual_id(client)
    too_long = "E-417. " * (settings.limit_message_chars // 7 + 1)
    r = await client.post("/v1/verify", headers=auth(CHAT_A), json={"answer": too_long, "snippet_ids": [ident]})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "answer" and "VLMRAG_LIMIT_MESSAGE_CHARS" in error["message"]
    for body in ({"answer": "x"}, {"snippet_ids": [ident]}, {"answer": "x", "snippet_ids": [ident], "completion_id": "c"},
                 {"answer": "x", "snippet_ids": [ident] * (settings.limit_k + 1)}):
        r = await client.post("/v1/verify", headers=auth(CHAT_A), json=body)
        assert r.status_code in (400, 422), (body, r.text)
    assert (await client.post("/v1/verify", json={"answer": "x", "snippet_ids": [ident]})).status_code == 401


async def test_post_verify_model_timeout_is_degraded_not_failed(served, fake_vllm: FakeVLLM) -> None:
    client = served["client"]
    ident = await manual_id(client)
    fake_vllm.rerank_delay_s = 30.0  # past verify_timeout_s (2 s here)
    r = await client.post("/v1/verify", headers=auth(CHAT_A), json={"answer": RIGHT, "snippet_ids": [ident],
                                                                   "verify": "model"})
    assert r.status_code == 200, r.text
    assert r.json()["degraded"] == ["verify"]
    assert [c["supported"] for c in r.json()["claims"]] == [None, None]
    assert r.json()["timings"]["verify"] < 10_000


async def test_an_answer_log_from_before_the_check_gets_its_column(settings: Settings) -> None:
    url = feedback_database_url(settings)
    path = url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:  # the answers table as the previous release made it
        conn.execute("CREATE TABLE answers (completion_id VARCHAR(100) PRIMARY KEY, key_id VARCHAR(100) NOT NULL, "
                     "kb VARCHAR(48) NOT NULL, question TEXT NOT NULL, search_query TEXT, sources TEXT NOT NULL, "
                     "model VARCHAR(200) NOT NULL, settings TEXT NOT NULL, answer TEXT NOT NULL, "
                     "created_at FLOAT NOT NULL)")
        conn.execute("INSERT INTO answers VALUES ('old', 'k', 'default', 'q', NULL, '[]', 'm', '{}', 'a', 1.0)")
    log = AnswerLog(url)
    try:
        await log.record(AnswerRecord("new", "k", "default", "q", None, [], "m", {}, 2.0, "a",
                                      verification={"mode": "lexical", "claims": [], "supported_ratio": None}))
        old, new = await log.get_answer("old"), await log.get_answer("new")
        assert old is not None and old.verification is None
        assert new is not None and new.verification == {"mode": "lexical", "claims": [], "supported_ratio": None}
    finally:
        log.close()
