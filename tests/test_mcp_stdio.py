"""``vlmrag mcp`` spawned as a child process and driven over stdio by the official ``mcp`` client: through a
running vlmrag (that key's knowledge bases) and on a local data dir no server holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from retriever.embedder import ClipEmbedder
from server.wiring import build_knowledge_base
from tests.support.fixtures_mcp import PUMP_TEXT, PUMPS_KEY, McpServer
from tests.support.fixtures_server import ingest_samples
from tests.support.settings import make_settings
from tests.support.vllm_server import REPO_ROOT

pytestmark = pytest.mark.subprocess

VLMRAG_MCP = [sys.executable, "-m", "server.cli"]


def child_env(**values: str) -> dict[str, str]:
    """This process's environment without its VLMRAG_* settings, plus ``values``; imports this checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLMRAG_")}
    env.update({"PYTHONPATH": str(REPO_ROOT), "VLMRAG_TEXT_EMBEDDER": "none", **values})
    return env


async def test_stdio_through_a_running_server_uses_its_key(mcp_server: McpServer, tmp_path: Path) -> None:
    params = StdioServerParameters(command=VLMRAG_MCP[0], args=[*VLMRAG_MCP[1:], "--data-dir", str(tmp_path), "mcp",
                                                                 "--server", mcp_server.url],
                                   env=child_env(VLMRAG_API_KEY=PUMPS_KEY), cwd=tmp_path)
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        tools = {t.name: t for t in (await session.list_tools()).tools}
        result = await session.call_tool("search", {"query": "pump error E-417"})
        refused = await session.call_tool("search", {"query": "card", "kb": "default"})
    assert set(tools) == {"search", "fetch", "list_knowledge_bases", "ask"}
    assert "`pumps`" in (tools["search"].description or "") and "`default`" not in (tools["search"].description or "")
    assert not result.is_error
    (hit,) = (result.structured_content or {})["results"]
    assert hit["id"] == f"pumps:{mcp_server.pump_id}" and hit["text"] == PUMP_TEXT
    assert refused.is_error and "no knowledge base 'default'" in refused.content[0].text  # type: ignore[union-attr]


def test_stdio_with_a_refused_key_stops_in_one_line(mcp_server: McpServer, tmp_path: Path) -> None:
    proc = subprocess.run([*VLMRAG_MCP, "--data-dir", str(tmp_path), "mcp", "--server", mcp_server.url],
                          env=child_env(VLMRAG_API_KEY="not-a-key-at-all-000"), cwd=tmp_path, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1 and proc.stdout == ""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    expected = (f"error: the vlmrag service at {mcp_server.mcp_url} refused the key (invalid API key): set "
                "VLMRAG_API_KEY to a key with the chat scope (`vlmrag keygen --scope chat`)")
    assert errors == [expected], proc.stderr[-2000:]


async def test_stdio_on_a_local_data_dir(tmp_path: Path, tiny_clip_config: Path, embedder: ClipEmbedder) -> None:
    data = tmp_path / "data"
    settings = make_settings(data, tiny_clip_config)
    kb = await build_knowledge_base(settings, embedder=embedder)
    try:
        await ingest_samples(kb)
    finally:
        await kb.close()  # the child opens the embedded store: this process lets go of it first
    env = child_env(VLMRAG_DATA_DIR=str(data), VLMRAG_CLIP_MODEL=str(tiny_clip_config), VLMRAG_CLIP_PRETRAINED="none",
                    VLMRAG_CLIP_DEVICE="cpu", VLMRAG_CLIP_BACKEND="torch", VLMRAG_RERANK_SCORER="clip",
                    VLMRAG_RETRIEVAL_THRESHOLD="0", VLMRAG_OCR_ENABLED="false", VLMRAG_OCR_QUERY_ENABLED="false",
                    VLMRAG_VLLM_URL="http://127.0.0.1:9")  # no auth configured: the data dir's owner needs no key
    params = StdioServerParameters(command=VLMRAG_MCP[0], args=[*VLMRAG_MCP[1:], "mcp"], env=env, cwd=tmp_path)
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        result = await session.call_tool("search", {"query": "a warm yellow card", "k": 2})
        kbs = await session.call_tool("list_knowledge_bases", {})
    assert not result.is_error, result.content
    results = json.loads(result.content[0].text)["results"]  # type: ignore[union-attr]
    assert 1 <= len(results) <= 2 and all(r["id"].startswith("default:") for r in results)
    assert any(c.type == "image" for c in result.content)
    assert [k["name"] for k in (kbs.structured_content or {})["knowledge_bases"]] == ["default"]
