"""An OpenAI Agents SDK agent whose model is vlmrag (the real tiny vLLM behind it) and whose tools are vlmrag's
MCP server (``MCPServerStreamableHttp`` at /mcp): a forced ``search`` call goes through MCP, the run finishes.

The random-weights model names the forced tool but does not follow its argument schema (this CPU vLLM answers
a named ``tool_choice`` with bare JSON such as ``true``, which the Agents SDK refuses before calling any tool),
so ``SchemaRepairingModel`` turns arguments that are not an object into ``{"query": <the user's question>}``.
Everything else is real: the SDK's MCP client, /mcp, the tool result fed back to the model, the last turn.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import httpx
import pytest

from tests.support.fixtures_server import LiveServer

pytestmark = pytest.mark.e2e

QUESTION = "How long is the bike warranty?"


def _search_calls(url: str) -> float:
    metrics = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(float(n) for n in re.findall(r'vlmrag_mcp_tool_calls_total\{outcome="[a-z_]+",tool="search"\} ([0-9.]+)',
                                             metrics))


def test_an_agent_calls_search_through_mcp_and_finishes(live_server: LiveServer) -> None:
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, set_tracing_disabled
    from agents.mcp import MCPServerStreamableHttp
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    repaired: list[str] = []

    class SchemaRepairingModel(OpenAIChatCompletionsModel):
        async def get_response(self, *args: Any, **kwargs: Any) -> Any:
            response = await super().get_response(*args, **kwargs)
            for item in response.output:
                if getattr(item, "type", None) == "function_call":
                    try:
                        ok = isinstance(json.loads(item.arguments), dict)
                    except ValueError:
                        ok = False
                    if not ok:
                        repaired.append(item.arguments)
                        item.arguments = json.dumps({"query": QUESTION})
            return response

    before = _search_calls(live_server.url)

    async def run() -> tuple[Any, list[str]]:
        client = AsyncOpenAI(base_url=live_server.base_url, api_key="not-needed-auth-off", max_retries=0)
        async with MCPServerStreamableHttp(params={"url": f"{live_server.url}/mcp", "timeout": 60},
                                           client_session_timeout_seconds=60, cache_tools_list=True) as server:
            names = [t.name for t in await server.list_tools()]
            agent = Agent(name="support", instructions="Look things up in the knowledge base.", mcp_servers=[server],
                          model=SchemaRepairingModel(model="vlmrag", openai_client=client),
                          model_settings=ModelSettings(tool_choice="search", max_tokens=200,
                                                       extra_body={"retrieval": {"k": 1, "scorer": "clip"}}))
            return await Runner.run(agent, QUESTION, max_turns=4), names

    result, names = asyncio.run(run())
    assert {"search", "fetch", "list_knowledge_bases", "ask"} <= set(names)
    assert _search_calls(live_server.url) == before + 1  # the forced call reached /mcp once; then tool_choice is auto
    (output,) = [item for item in result.new_items if type(item).__name__ == "ToolCallOutputItem"]
    assert '"results"' in str(output.output) and "error" not in str(output.output).lower()[:40]
    assert isinstance(result.final_output, str)
