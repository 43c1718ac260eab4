"""OpenAI compatibility beyond plain chat: tools, structured output, sampling fields, follow-up questions.

The scripted vLLM records every body vlmrag sends, so each request field is checked where it leaves;
streamed tool calls replay chunks captured from the real vLLM 0.32 (tests/data/vllm_samples/tool_calls.json).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.support.fake_vllm import FakeVLLM
from tests.support.fixtures_server import ingest_samples
from tests.support.media import data_url, sse_events
from tests.test_api import assert_error

SAMPLE = json.loads((Path(__file__).parent / "data" / "vllm_samples" / "tool_calls.json").read_text())
TOOLS = SAMPLE["request"]["tools"]
NAMED = {"type": "function", "function": {"name": "create_ticket"}}
SCHEMA = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {
    "type": "object", "properties": {"escalate": {"type": "boolean"}}, "required": ["escalate"]}}}


@pytest.fixture
async def ids(knowledge_base) -> list[str]:
    return await ingest_samples(knowledge_base)


def ask(text: str = "my pump shows E-417, open a ticket", **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], "retrieval": {"scorer": "clip"}, **extra}


def answer_body(fake: FakeVLLM) -> dict[str, Any]:
    return [b for b in fake.chat_bodies if "<conversation>" not in json.dumps(b["messages"][-1])][-1]


# --- pass-through: every field reaches vLLM ------------------------------------------------------------
FORWARDED = {
    "tools": TOOLS, "tool_choice": NAMED, "parallel_tool_calls": False, "response_format": SCHEMA,
    "logprobs": True, "top_logprobs": 3, "frequency_penalty": 0.5, "presence_penalty": -0.5,
    "logit_bias": {"42": -100.0}, "stop": ["\n\n"], "seed": 7, "n": 2, "top_k": 20, "min_p": 0.05,
    "repetition_penalty": 1.1, "min_tokens": 1, "temperature": 0.3, "top_p": 0.9,
    "structured_outputs": {"choice": ["yes", "no"]},
}


@pytest.mark.parametrize("name", sorted(FORWARDED))
async def test_each_output_changing_field_reaches_vllm(client, ids, fake_vllm: FakeVLLM, name: str) -> None:
    r = await client.post("/v1/chat/completions", json=ask(**{name: FORWARDED[name]},
                                                           **({"tools": TOOLS} if name == "tool_choice" else {}),
                                                           **({"logprobs": True} if name == "top_logprobs" else {})))
    assert r.status_code == 200, r.text
    assert fake_vllm.chat_bodies[-1][name] == FORWARDED[name]


async def test_max_completion_tokens_and_guided_fields(client, ids, fake_vllm: FakeVLLM) -> None:
    r = await client.post("/v1/chat/completions", json=ask(max_completion_tokens=12, guided_choice=["a", "b"]))
    assert r.status_code == 200, r.text
    body = fake_vllm.chat_bodies[-1]
    assert body["max_tokens"] == 12
    # vLLM 0.11+ ignores guided_*: they go as the structured_outputs it reads
    assert body["structured_outputs"] == {"choice": ["a", "b"]} and "guided_choice" not in body


async def test_stream_options_are_ours_and_unknown_fields_ignored(client, ids, fake_vllm: FakeVLLM) -> None:
    r = await client.post("/v1/chat/completions", json=ask(stream=True, store=False, metadata={"a": "b"},
                                                           service_tier="auto"))
    assert r.status_code == 200
    body = fake_vllm.chat_bodies[-1]
    assert body["stream_options"] == {"include_usage": True}
    assert not {"store", "metadata", "service_tier"} & set(body)


@pytest.mark.parametrize("field, value", [("functions", [{"name": "f"}]), ("function_call", "auto"),
                                          ("echo", True), ("chat_template", "x"), ("prompt_logprobs", 1),
                                          ("use_beam_search", True)])
async def test_fields_we_do_not_forward_are_refused_by_name(client, ids, field: str, value: Any) -> None:
    err = assert_error(await client.post("/v1/chat/completions", json=ask(**{field: value})), 400)
    assert field in err["message"]


async def test_unsupported_part_types_say_what_is_supported(client, ids) -> None:
    message = {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAA", "format": "wav"}}]}
    err = assert_error(await client.post("/v1/chat/completions", json={"messages": [message]}), 400)
    assert "input_audio" in err["message"] and "text" in err["message"] and "image_url" in err["message"]


async def test_n_over_the_cap_is_a_clear_400(client, ids) -> None:
    err = assert_error(await client.post("/v1/chat/completions", json=ask(n=9)), 400)
    assert err["param"] == "n"


async def test_a_tool_schema_vllm_refuses_is_a_400_with_its_message(client, ids, fake_vllm: FakeVLLM) -> None:
    fake_vllm.failures = [400]
    err = assert_error(await client.post("/v1/chat/completions", json=ask(tools=TOOLS)), 400)
    assert "scripted 400" in err["message"]


# --- tool calls back ---------------------------------------------------------------------------------------
async def test_tool_calls_come_back_non_streamed(client, ids, fake_vllm: FakeVLLM) -> None:
    fake_vllm.tool_sample = SAMPLE
    r = await client.post("/v1/chat/completions", json=ask(tools=TOOLS, tool_choice=NAMED))
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    expected = SAMPLE["non_stream"]["choices"][0]
    assert choice["message"]["tool_calls"] == expected["message"]["tool_calls"]
    assert choice["finish_reason"] == expected["finish_reason"]
    assert r.json()["sources"], "the knowledge-base context still goes in"


async def test_streamed_tool_call_chunks_are_relayed_exactly(client, ids, fake_vllm: FakeVLLM) -> None:
    fake_vllm.tool_sample = SAMPLE
    r = await client.post("/v1/chat/completions", json=ask(tools=TOOLS, tool_choice=NAMED, stream=True))
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    final = events[-2]
    assert final["choices"] == [] and "sources" in final and "timings" in final and "degraded" in final
    relayed = [c["delta"]["tool_calls"] for e in events[:-2] for c in e["choices"] if c["delta"].get("tool_calls")]
    upstream = [c["delta"]["tool_calls"] for e in SAMPLE["stream_named"] for c in e["choices"]
                if c["delta"].get("tool_calls")]
    assert relayed == upstream and len(relayed) >= 2  # name first, then argument fragments
    finishes = [c["finish_reason"] for e in events[:-2] for c in e["choices"] if c.get("finish_reason")]
    assert finishes == [c["finish_reason"] for e in SAMPLE["stream_named"] for c in e["choices"]
                        if c.get("finish_reason")]


async def test_streamed_logprobs_are_relayed(client, ids, fake_vllm: FakeVLLM) -> None:
    r = await client.post("/v1/chat/completions", json=ask(stream=True, logprobs=True, top_logprobs=0))
    events = sse_events(r.text)
    logprobs = [c["logprobs"] for e in events[:-1] for c in e["choices"] if c.get("logprobs")]
    assert logprobs and all(lp["content"][0]["logprob"] == -0.5 for lp in logprobs)


def tool_conversation() -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": "my pump shows E-417, open a ticket"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "create_ticket", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"ticket": 123}'},
    ]


async def test_a_tool_result_turn_is_accepted_and_not_searched(client, ids, fake_vllm: FakeVLLM) -> None:
    r = await client.post("/v1/chat/completions", json={"messages": tool_conversation(), "tools": TOOLS})
    assert r.status_code == 200, r.text
    assert r.json()["sources"] == [] and r.json()["search_query"] is None
    sent = fake_vllm.chat_bodies[-1]["messages"]
    # the conversation goes on as the caller sent it (null fields left out)
    assert sent == [{k: v for k, v in m.items() if v is not None} for m in tool_conversation()]


async def test_on_tool_result_search_searches_the_question(client, ids, fake_vllm: FakeVLLM) -> None:
    body = {"messages": tool_conversation(), "tools": TOOLS,
            "retrieval": {"on_tool_result": "search", "scorer": "clip", "query": "last"}}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["sources"] and r.json()["search_query"] == "my pump shows E-417, open a ticket"
    sent = fake_vllm.chat_bodies[-1]["messages"]
    assert sent[-1] == tool_conversation()[-1] and sent[-2]["tool_calls"] == tool_conversation()[1]["tool_calls"]


async def test_limits_apply_to_tool_messages(make_client) -> None:
    async with make_client(limit_message_chars=50) as client:
        conversation = tool_conversation()
        conversation[-1]["content"] = "x" * 51
        err = assert_error(await client.post("/v1/chat/completions", json={"messages": conversation}), 400)
        assert err["param"] == "messages[2].content"


# --- follow-up questions -----------------------------------------------------------------------------------
FOLLOW_UP = [
    {"role": "user", "content": "The P-100 pump shows error E-417."},
    {"role": "assistant", "content": "E-417 means the pump overheated [1]."},
    {"role": "user", "content": "and how do I replace it?"},
]


def rerank_queries(fake: FakeVLLM) -> set[str]:
    texts = set()
    for body in fake.chat_bodies:
        if body.get("logprobs") and body.get("max_tokens") == 1:
            text = "".join(p.get("text", "") for p in body["messages"][0]["content"] if p["type"] == "text")
            texts.add(text.split("<query>", 1)[1].split("</query>", 1)[0].strip())
    return texts


@pytest.mark.parametrize("mode, expected", [
    ("last", "and how do I replace it?"),
    ("recent", "and how do I replace it?\nThe P-100 pump shows error E-417."),
])
async def test_query_modes_search_what_they_say(client, ids, fake_vllm: FakeVLLM, mode: str, expected: str) -> None:
    r = await client.post("/v1/chat/completions", json={"messages": FOLLOW_UP, "retrieval": {"query": mode, "scorer": "vlm"}})
    assert r.status_code == 200, r.text
    assert r.json()["search_query"] == expected
    assert rerank_queries(fake_vllm) == {expected}  # the re-ranker judges against the same query


async def test_recent_respects_its_budget(make_client, knowledge_base, fake_vllm: FakeVLLM) -> None:
    async with make_client(retrieval_recent_chars=30) as client:
        r = await client.post("/v1/chat/completions", json={"messages": FOLLOW_UP, "retrieval": {"query": "recent"}})
        assert r.json()["search_query"] == "and how do I replace it?"  # the older turn does not fit


async def test_rewrite_calls_the_model_once_and_searches_its_query(client, ids, fake_vllm: FakeVLLM) -> None:
    fake_vllm.rewrite_answer = "replace P-100 pump (error E-417)\nextra line"
    r = await client.post("/v1/chat/completions", json={"messages": FOLLOW_UP, "retrieval": {"query": "rewrite", "scorer": "vlm"}})
    assert r.status_code == 200, r.text
    assert r.json()["search_query"] == "replace P-100 pump (error E-417)"
    rewrites = [b for b in fake_vllm.chat_bodies if "<conversation>" in json.dumps(b["messages"])]
    assert len(rewrites) == 1 and rewrites[0]["max_tokens"] == 48
    assert "The P-100 pump shows error E-417." in rewrites[0]["messages"][0]["content"]
    assert "rewrite" in r.json()["timings"] and r.json()["degraded"] == []
    assert rerank_queries(fake_vllm) == {"replace P-100 pump (error E-417)"}


async def test_a_failed_rewrite_falls_back_to_recent(client, ids, fake_vllm: FakeVLLM) -> None:
    fake_vllm.failures = [400]  # the first model call is the rewrite; a 400 is not retried
    r = await client.post("/v1/chat/completions", json={"messages": FOLLOW_UP, "retrieval": {"query": "rewrite", "scorer": "vlm"}})
    assert r.status_code == 200, r.text
    assert r.json()["search_query"] == "and how do I replace it?\nThe P-100 pump shows error E-417."
    assert "rewrite" in r.json()["degraded"]


def query_images_in_rerank(fake: FakeVLLM) -> list[int]:
    """For each relevancy request: how many images stand in its <query> part."""
    counts = []
    for body in fake.chat_bodies:
        if body.get("logprobs") and body.get("max_tokens") == 1:
            n = 0
            for part in body["messages"][0]["content"]:
                if part["type"] == "text" and "</query>" in part["text"]:
                    break
                n += part["type"] == "image_url"
            counts.append(n)
    return counts


@pytest.mark.parametrize("mode, images", [("recent", 1), ("last", 0)])
async def test_earlier_images_are_query_images_when_the_last_turn_has_none(
    client, ids, fake_vllm: FakeVLLM, mode: str, images: int,
) -> None:
    from tests.test_api import PNG, user

    messages = [user("what is this part?", data_url(PNG)), {"role": "assistant", "content": "a gasket [1]"},
                {"role": "user", "content": "where does it go?"}]
    r = await client.post("/v1/chat/completions", json={"messages": messages, "retrieval": {"query": mode, "scorer": "vlm"}})
    assert r.status_code == 200, r.text
    counts = query_images_in_rerank(fake_vllm)
    assert counts and set(counts) == {images}


async def test_a_junk_rewrite_falls_back_to_recent(client, ids, fake_vllm: FakeVLLM) -> None:
    fake_vllm.rewrite_answer = "\x11\x07 \ufffd? \x1b"  # what a random-weight model writes
    r = await client.post("/v1/chat/completions", json={"messages": FOLLOW_UP, "retrieval": {"query": "rewrite"}})
    assert r.status_code == 200, r.text
    assert r.json()["search_query"] == "and how do I replace it?\nThe P-100 pump shows error E-417."
    assert "rewrite" in r.json()["degraded"]
