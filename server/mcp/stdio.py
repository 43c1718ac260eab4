"""``vlmrag mcp``: the MCP tools over stdio, for assistants that spawn a process (Claude Desktop, Cursor).

* **Through a running vlmrag** (``--server URL``, or the server ``DATA_DIR/server.json`` names): every
  tools/list and tools/call goes to its ``/mcp`` with ``Authorization: Bearer $VLMRAG_API_KEY`` — that
  server's keys, knowledge bases, rate and input limits. Nothing heavy is imported (no torch).
* **On the local data dir** when no server holds it: the app's services are built in this process, as
  ``vlmrag serve`` builds them (but no socket), and the same ``McpTools`` answer as the data dir's owner:
  every knowledge base, no key.

stdout carries the protocol: the SDK's ``stdio_server`` points fd 1 at stderr while it serves, and it is
entered before anything loads, so no library's output lands on the wire; logs go to stderr.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import mcp_types as types
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.server.lowlevel.server import Server
from mcp.server.stdio import stdio_server
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError

from retriever.errors import Unauthorized, UpstreamUnavailable, VlmragError
from server.mcp.protocol import INSTRUCTIONS
from server.settings import Settings

API_KEY_ENV = "VLMRAG_API_KEY"  # the variable `vlmrag ingest --server` reads too
MCP_PATH = "/mcp"


def mcp_url(url: str) -> str:
    """``http://host:8080`` → ``http://host:8080/mcp`` (a URL already ending in /mcp is kept)."""
    url = url.rstrip("/")
    return url if url.endswith(MCP_PATH) else url + MCP_PATH


def _leaf(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups, as the SDK's task groups raise them."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _as_vlmrag_error(exc: BaseException, url: str) -> BaseException:
    """A failure to reach or use the remote /mcp as one vlmrag error (printed as one line by the CLI)."""
    leaf = _leaf(exc)
    if isinstance(leaf, VlmragError):
        return leaf
    if isinstance(leaf, MCPError):
        status = (leaf.error.data or {}).get("status") if isinstance(leaf.error.data, dict) else None
        if status in (401, 403):
            return Unauthorized(f"the vlmrag service at {url} refused the key ({leaf.error.message}): set "
                                f"{API_KEY_ENV} to a key with the chat scope (`vlmrag keygen --scope chat`)")
        return UpstreamUnavailable(f"the vlmrag service at {url} answered an error: {leaf.error.message}")
    return UpstreamUnavailable(f"cannot reach the vlmrag MCP endpoint at {url}: {type(leaf).__name__}: {leaf}")


@asynccontextmanager
async def remote_session(url: str, key: str | None) -> AsyncIterator[ClientSession]:
    """An initialized MCP client session with vlmrag's ``/mcp`` at ``url``, sending ``key`` as Bearer."""
    headers = {"Authorization": f"Bearer {key}"} if key else None
    async with create_mcp_http_client(headers=headers) as http, \
            streamable_http_client(url, http_client=http) as (read, write, *_), ClientSession(read, write) as session:
        await session.initialize()
        yield session


def build_proxy_server(remote: ClientSession, url: str) -> Server[Any]:
    """A stdio-side server whose tools are the remote ``/mcp``'s, for the remote's key."""

    async def on_list_tools(ctx: Any, params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        return types.ListToolsResult(tools=(await remote.list_tools()).tools)

    async def on_call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        try:
            result = await remote.call_tool(params.name, params.arguments or {})
        except Exception as exc:  # noqa: BLE001 - the service went away or refused: the assistant is told, not crashed
            message = str(_as_vlmrag_error(exc, url))
            return types.CallToolResult(content=[types.TextContent(type="text", text=message)], is_error=True)
        return types.CallToolResult(content=result.content, structured_content=result.structured_content,
                                    is_error=result.is_error)

    return Server("vlmrag", title="vlmrag knowledge base", instructions=INSTRUCTIONS,
                  on_list_tools=on_list_tools, on_call_tool=on_call_tool)


async def serve_proxy(url: str, key: str | None) -> None:
    """Serve stdio until the client closes it, forwarding to the vlmrag ``/mcp`` at ``url``."""
    try:
        async with stdio_server() as (read, write), remote_session(url, key) as remote:
            await remote.list_tools()  # a refused key fails now, in one line, not at the first call
            server = build_proxy_server(remote, url)
            await server.run(read, write, server.create_initialization_options())
    except Exception as exc:  # task groups wrap everything: unwrap to one error
        error = _as_vlmrag_error(exc, url)
        if error is exc:
            raise
        raise error from None


async def serve_local(settings: Settings) -> None:
    """Serve stdio until the client closes it, with this process's own services on ``settings.data_dir``."""
    from server.app import create_app  # torch, the store: only for the local mode
    from server.auth import SCOPES, Principal
    from server.mcp.server import build_server
    from server.mcp.tools import McpCaller, McpTools

    # the data dir's owner: every KB and scope, no key; no socket is opened, so the loopback host is honest
    local = settings.model_copy(update={"auth_disabled": True, "host": "127.0.0.1", "mcp_enabled": False})
    caller = McpCaller(Principal("local", frozenset(SCOPES)), settings.public_url)
    try:
        async with stdio_server() as (read, write):
            app = create_app(local)
            async with app.router.lifespan_context(app):
                server = build_server(McpTools(app.state.vlmrag), lambda _ctx: caller, version=app.version)
                await server.run(read, write, server.create_initialization_options())
    except Exception as exc:  # task groups wrap everything: unwrap to one error
        leaf = _leaf(exc)
        if leaf is exc:
            raise
        raise leaf from None
