"""MCP fixtures: ``mcp_server`` (vlmrag under real uvicorn with API keys bound to two knowledge bases, the
scripted vLLM behind it) and ``mcp_session(url, key)``, the official ``mcp`` client's session with it.

Names are a contract for other test modules: ``mcp_server``, ``McpServer``, ``mcp_session``, ``ADMIN_KEY``,
``DEFAULT_KEY`` (bound to ``default``), ``PUMPS_KEY`` (bound to ``pumps``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from server.app import create_app
from server.settings import Settings
from tests.support.fake_vllm import FakeVLLM
from tests.support.fixtures_server import UvicornThread, sample_snippets
from tests.support.settings import make_settings
from tests.support.vllm_server import free_port

ADMIN_KEY = "admin-key-for-mcp-tests-0001"
DEFAULT_KEY = "default-key-for-mcp-tests-02"
PUMPS_KEY = "pumps-key-for-mcp-tests-0003"
PUMP_TEXT = "Error E-417 on the pump means the impeller is blocked; clean it before restarting."


@asynccontextmanager
async def mcp_session(url: str, key: str | None = None, *, header: str = "authorization") -> AsyncIterator[ClientSession]:
    """An initialized client session with ``url`` (…/mcp), sending ``key`` as Bearer (or as ``X-API-Key``)."""
    headers = {} if key is None else {"Authorization": f"Bearer {key}"} if header == "authorization" else {header: key}
    async with create_mcp_http_client(headers=headers) as http, \
            streamable_http_client(url, http_client=http) as (read, write, *_), ClientSession(read, write) as session:
        await session.initialize()
        yield session


@dataclass(slots=True)
class McpServer:
    url: str  # the app's base URL; /mcp is under it
    settings: Settings
    fake_vllm: FakeVLLM
    default_ids: list[str]  # sample_snippets() in the default KB, in order
    pump_id: str  # PUMP_TEXT in the pumps KB

    @property
    def mcp_url(self) -> str:
        return f"{self.url}/mcp"

    def rest(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


@pytest.fixture(scope="session")
def mcp_server(tmp_path_factory: pytest.TempPathFactory, tiny_clip_config: Path) -> Iterator[McpServer]:
    """Auth on: an admin key (every KB), a key bound to ``default``, one bound to ``pumps``; samples ingested."""
    keys = f"admin:{ADMIN_KEY},chat@default:{DEFAULT_KEY},chat@pumps:{PUMPS_KEY}"
    settings = make_settings(tmp_path_factory.mktemp("mcp_data"), tiny_clip_config, auth_disabled=False,
                             api_keys=keys)
    fake = FakeVLLM()
    server = UvicornThread(create_app(settings, vllm_transport=httpx.MockTransport(fake)), free_port())
    server.start()
    url = f"http://127.0.0.1:{server.server.config.port}"
    try:
        ids = []
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60) as http:
            for s in sample_snippets():
                files = {"image": (s.source.rsplit("/", 1)[-1], s.image, "image/png")} if s.image else None
                response = http.post("/v1/snippets", data={"text": s.text, "source": s.source, "tags": s.tags},
                                     files=files)
                response.raise_for_status()
                ids.append(response.json()["id"])
            http.post("/v1/knowledge-bases", json={"name": "pumps", "display_name": "Pump manuals",
                                                   "description": "Service manuals of the pumps"}).raise_for_status()
            pump = http.post("/v1/snippets", params={"kb": "pumps"},
                             data={"text": PUMP_TEXT, "source": "pump-manual.pdf", "page": "3", "tags": ["manual"]})
            pump.raise_for_status()
        yield McpServer(url, settings, fake, ids, pump.json()["id"])
    finally:
        server.stop()
