"""Tools, structured output and logprobs through vlmrag to the real tiny vLLM (hermes tool parser).

Random weights answer nonsense, but vLLM's guided decoding makes a named ``tool_choice`` come back as a
well-formed tool call and a ``json_schema`` answer as JSON for the schema: the protocol is real.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai import OpenAI

from tests.support.fixtures_server import LiveServer

pytestmark = pytest.mark.e2e

TOOLS = [{"type": "function", "function": {
    "name": "create_ticket", "description": "Open a support ticket",
    "parameters": {"type": "object", "properties": {"urgent": {"type": "boolean"}}, "required": ["urgent"]}}}]
NAMED = {"type": "function", "function": {"name": "create_ticket"}}
QUESTION = [{"role": "user", "content": "My pump shows E-417. Open a ticket."}]
CLIP = {"retrieval": {"k": 2, "scorer": "clip"}}


@pytest.fixture(scope="module")
def sdk(live_server: LiveServer) -> OpenAI:
    return OpenAI(base_url=live_server.base_url, api_key="not-needed-auth-off", max_retries=0, timeout=120)


def test_named_tool_choice_comes_back_as_a_tool_call(sdk: OpenAI) -> None:
    resp = sdk.chat.completions.create(model="vlmrag", messages=QUESTION, tools=TOOLS, tool_choice=NAMED,
                                       max_tokens=200, seed=0, extra_body=CLIP)
    (call,) = resp.choices[0].message.tool_calls or []
    assert call.function.name == "create_ticket" and call.id and call.type == "function"
    json.loads(call.function.arguments)  # well-formed JSON arguments
    assert (resp.model_extra or {})["sources"], "retrieval still ran"


def test_streamed_tool_call_deltas_and_final_chunk(sdk: OpenAI) -> None:
    stream = sdk.chat.completions.create(model="vlmrag", messages=QUESTION, tools=TOOLS, tool_choice=NAMED,
                                         max_tokens=200, seed=0, stream=True, extra_body=CLIP)
    chunks = list(stream)
    deltas = [tc for c in chunks for ch in c.choices for tc in (ch.delta.tool_calls or [])]
    assert deltas and deltas[0].function and deltas[0].function.name == "create_ticket" and deltas[0].id
    assert all(d.index == 0 for d in deltas)
    arguments = "".join(d.function.arguments or "" for d in deltas if d.function)
    json.loads(arguments)
    final = chunks[-1]
    assert final.choices == [] and (final.model_extra or {}).get("sources") is not None
    assert final.usage is not None and final.usage.completion_tokens >= 1


def test_two_step_tool_conversation_is_accepted(sdk: OpenAI) -> None:
    first = sdk.chat.completions.create(model="vlmrag", messages=QUESTION, tools=TOOLS, tool_choice=NAMED,
                                        max_tokens=200, seed=0, extra_body=CLIP)
    call = (first.choices[0].message.tool_calls or [])[0]
    messages: list[Any] = [*QUESTION, first.choices[0].message.model_dump(exclude_none=True),
                           {"role": "tool", "tool_call_id": call.id, "content": '{"ticket": 123}'}]
    answer = sdk.chat.completions.create(model="vlmrag", messages=messages, tools=TOOLS, max_tokens=8)
    assert isinstance(answer.choices[0].message.content, str)
    assert (answer.model_extra or {})["sources"] == []  # a tool result is not searched by default


def test_json_schema_output_parses_against_its_schema(sdk: OpenAI) -> None:
    schema = {"type": "object", "properties": {"category": {"type": "string", "enum": ["pump", "valve"]},
                                                "escalate": {"type": "boolean"}},
              "required": ["category", "escalate"], "additionalProperties": False}
    finished = []
    for seed in range(4):  # random weights may spend the budget on whitespace; a finished answer must parse
        resp = sdk.chat.completions.create(
            model="vlmrag", messages=QUESTION, max_tokens=120, seed=seed, extra_body=CLIP,
            response_format={"type": "json_schema", "json_schema": {"name": "triage", "schema": schema}},
        )
        if resp.choices[0].finish_reason == "stop":
            finished.append(json.loads(resp.choices[0].message.content or ""))
    assert finished, "no seed finished within 120 tokens"
    for value in finished:
        assert set(value) == {"category", "escalate"}
        assert value["category"] in ("pump", "valve") and isinstance(value["escalate"], bool)


def test_logprobs_arrive(sdk: OpenAI) -> None:
    resp = sdk.chat.completions.create(model="vlmrag", messages=QUESTION, max_tokens=3, logprobs=True,
                                       top_logprobs=2, extra_body=CLIP)
    content = (resp.choices[0].logprobs and resp.choices[0].logprobs.content) or []
    assert len(content) == resp.usage.completion_tokens  # type: ignore[union-attr]
    assert all(len(item.top_logprobs) == 2 for item in content)


def test_an_agents_sdk_loop_runs_a_forced_tool_call(live_server: LiveServer) -> None:
    """The OpenAI Agents SDK drives vlmrag as its model: forced tool call, tool runs, final answer."""
    import asyncio

    from agents import (
        Agent,
        FunctionTool,
        ModelSettings,
        OpenAIChatCompletionsModel,
        Runner,
        set_tracing_disabled,
    )
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    calls: list[str] = []

    async def create_ticket(_ctx: Any, arguments: str) -> str:
        calls.append(arguments)
        return '{"ticket": 123}'

    tool = FunctionTool(name="create_ticket", description="Open a support ticket",
                        params_json_schema=TOOLS[0]["function"]["parameters"], on_invoke_tool=create_ticket,
                        strict_json_schema=False)

    async def run() -> Any:
        client = AsyncOpenAI(base_url=live_server.base_url, api_key="not-needed-auth-off", max_retries=0)
        agent = Agent(name="support", instructions="Open tickets for the user.", tools=[tool],
                      model=OpenAIChatCompletionsModel(model="vlmrag", openai_client=client),
                      model_settings=ModelSettings(tool_choice="create_ticket", max_tokens=200,
                                                   extra_body={"retrieval": {"k": 1, "scorer": "clip"}}))
        return await Runner.run(agent, "My pump shows E-417. Open a ticket.", max_turns=4)

    result = asyncio.run(run())
    assert len(calls) == 1  # the forced call ran once; then tool_choice went back to auto
    assert isinstance(result.final_output, str)
