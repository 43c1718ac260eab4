"""The MCP server over ``McpTools`` (the SDK's low-level ``Server``) and its HTTP endpoint ``/mcp`` in the app.

``/mcp`` speaks streamable HTTP, stateless, with JSON responses (``StreamableHTTPSessionManager(stateless=True,
json_response=True)``): every POST stands alone, so replicas and ``--workers`` need no session affinity.
FastAPI does not run a mounted app's lifespan, so vlmrag's own lifespan runs the session manager
(``run_mcp``, entered by ``server/app.py``) and keeps it on ``app.state.mcp``.

Each HTTP request is authenticated before the SDK sees it, by ``server.auth.authenticate`` (``Authorization:
Bearer`` or ``X-API-Key``, the ``chat`` scope; failed attempts charged to the client address as for REST):
a refusal is a JSON-RPC error body with the REST status (401, 403, 429 + ``Retry-After``), which the MCP
client raises as an error. A request with an ``Origin`` header (a browser) must come from
``settings.cors_origins`` (the MCP spec's DNS-rebinding guard). Everything after that (rate limits per tool
call, KB bindings, input limits) is ``McpTools``'.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import mcp_types as types
from fastapi import FastAPI
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from starlette.requests import Request
from starlette.routing import Match, Route
from starlette.types import Receive, Scope, Send

from retriever.errors import Forbidden, RateLimited, Unauthorized, VlmragError
from server.auth import authenticate, client_address
from server.errors import body_for
from server.mcp.protocol import INSTRUCTIONS
from server.mcp.tools import McpCaller, McpTools

if TYPE_CHECKING:
    from server.state import AppState

PATH = "/mcp"
PRINCIPAL_SCOPE_KEY = "vlmrag.principal"  # where the endpoint leaves the caller for the tools
SERVER_ERROR = -32001  # JSON-RPC implementation-defined server error: the request was refused before the SDK

CallerOf = Callable[[ServerRequestContext[Any, Any]], McpCaller]


def build_server(tools: McpTools, caller_of: CallerOf, *, version: str = "") -> Server[Any]:
    """The SDK's low-level server: tools/list and tools/call answered by ``tools`` for the caller of each request."""

    async def on_list_tools(ctx: ServerRequestContext[Any, Any],
                            params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        return types.ListToolsResult(tools=await tools.list_tools(caller_of(ctx)))

    async def on_call_tool(ctx: ServerRequestContext[Any, Any],
                           params: types.CallToolRequestParams) -> types.CallToolResult:
        return await tools.call(params.name, params.arguments or {}, caller_of(ctx))

    return Server("vlmrag", version=version, title="vlmrag knowledge base", instructions=INSTRUCTIONS,
                  on_list_tools=on_list_tools, on_call_tool=on_call_tool,
                  get_tool_input_schema=tools.input_schema)


def http_caller(public_url: str) -> CallerOf:
    """The caller of an HTTP request: the principal the endpoint authenticated, links under ``public_url``
    (else under the request's own base URL)."""

    def caller_of(ctx: ServerRequestContext[Any, Any]) -> McpCaller:
        request = ctx.request
        if not isinstance(request, Request) or PRINCIPAL_SCOPE_KEY not in request.scope:
            raise Unauthorized("this MCP request was not authenticated")  # only /mcp's endpoint reaches here
        base = public_url or str(request.base_url)
        return McpCaller(request.scope[PRINCIPAL_SCOPE_KEY], base.rstrip("/"))

    return caller_of


class McpHttp:
    """The running streamable-HTTP handler of one app: authenticate, then hand the request to the SDK."""

    def __init__(self, state: AppState, manager: StreamableHTTPSessionManager) -> None:
        self.state = state
        self.manager = manager

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope)
        access = self.state.access
        try:
            self._check_origin(request)
            try:
                principal = authenticate(request, "chat", access)
            except Unauthorized:
                access.limiters.charge_auth_failure(client_address(request))  # 429 once over the budget
                raise
        except VlmragError as exc:
            self.state.metrics.observe_error(exc.error_type, exc.status_code)
            await _refuse(exc, send)
            return
        scope[PRINCIPAL_SCOPE_KEY] = principal
        await self.manager.handle_request(scope, receive, send)

    def _check_origin(self, request: Request) -> None:
        origin = request.headers.get("origin")
        allowed = self.state.settings.cors_origins
        if origin and "*" not in allowed and origin not in allowed:
            raise Forbidden(f"origin {origin[:100]!r} may not call /mcp (VLMRAG_CORS_ORIGINS)", code="origin_refused")


async def _refuse(exc: VlmragError, send: Send) -> None:
    """A JSON-RPC error body (no id: the request was not read) with the REST API's status and headers."""
    data = {**body_for(exc)["error"], "status": exc.status_code}
    body = json.dumps({"jsonrpc": "2.0", "id": None,
                       "error": {"code": SERVER_ERROR, "message": exc.message, "data": data}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if isinstance(exc, Unauthorized):
        headers.append((b"www-authenticate", b'Bearer realm="vlmrag"'))
    if isinstance(exc, RateLimited) and exc.retry_after is not None:
        headers.append((b"retry-after", str(max(1, math.ceil(exc.retry_after))).encode()))
    await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@asynccontextmanager
async def run_mcp(state: AppState, *, version: str = "") -> AsyncIterator[McpHttp]:
    """Run the SDK's session manager for the app's lifespan; yields the handler ``/mcp`` calls."""
    settings = state.settings
    server = build_server(McpTools(state), http_caller(settings.public_url), version=version)
    manager = StreamableHTTPSessionManager(server, json_response=True, stateless=True,
                                           max_request_body_size=settings.limit_body_bytes)
    # The manager's task group must be left in the task that entered it; a lifespan may be entered and left
    # in two tasks (test clients do), so one task of its own holds it for the app's lifetime.
    ready, stop = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        async with manager.run():
            ready.set()
            await stop.wait()

    holder = asyncio.create_task(hold(), name="vlmrag-mcp-session-manager")
    waiting = asyncio.ensure_future(ready.wait())
    await asyncio.wait({holder, waiting}, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    if holder.done():
        holder.result()  # it failed to start: raise why
    try:
        yield McpHttp(state, manager)
    finally:
        stop.set()
        await holder


class McpEndpoint:
    """The ASGI app at ``/mcp``: the handler the lifespan started (``app.state.mcp``)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler: McpHttp = scope["app"].state.mcp
        await handler.handle(scope, receive, send)


class McpRoute(Route):
    """``/mcp``; it names itself in the scope as FastAPI's routes do, so request metrics label it ``/mcp``."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        if match != Match.NONE:
            child_scope["route"] = self
        return match, child_scope


def mount_mcp(app: FastAPI) -> None:
    """Serve ``/mcp`` (the lifespan must enter ``run_mcp`` and set ``app.state.mcp``)."""
    app.router.routes.append(McpRoute(PATH, endpoint=McpEndpoint(), methods=["POST"],
                                      include_in_schema=False))
