"""``vlmrag mcp [--server URL]``: the knowledge base as MCP tools over stdio (Claude Desktop, Cursor, ...).

Through a running vlmrag when ``--server URL`` names one or ``DATA_DIR/server.json`` announces one (its
``/mcp``, with ``Authorization: Bearer $VLMRAG_API_KEY``: that key's knowledge bases and limits); else on
the local data dir itself, as its owner (every knowledge base, no key). Tools: search, fetch,
list_knowledge_bases, ask (see server/mcp/tools.py). stdout is the protocol; logs go to stderr.
"""

from __future__ import annotations

import argparse
import os

import anyio

from retriever.errors import InvalidInput
from server.settings import Settings


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "mcp", help="Serve the knowledge base as MCP tools over stdio (for Claude Desktop, Cursor, ...).",
        description=__doc__.split("\n\n")[1],
    )
    parser.add_argument("--server", metavar="URL",
                        help="A running vlmrag (default: the one serving this data dir, else the data dir itself).")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from server.commands.serve import read_run_file  # uvicorn, no torch
    from server.mcp.stdio import API_KEY_ENV, mcp_url, serve_local, serve_proxy

    if settings.blob_namespace:  # `vlmrag --kb NAME` narrowed the settings to one KB's collection
        raise InvalidInput("vlmrag mcp serves every knowledge base (the tools take a kb argument); drop --kb, "
                           "or bind a key to one knowledge base and use --server", param="kb")
    running = None if args.server else read_run_file(settings.data_dir)
    url = args.server or (str(running["url"]) if running else None)
    if url:
        anyio.run(serve_proxy, mcp_url(url), os.environ.get(API_KEY_ENV) or None)
    else:
        anyio.run(serve_local, settings)
    return 0
