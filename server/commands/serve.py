"""``vlmrag serve [--host HOST] [--port PORT]``: run the API with uvicorn (default 127.0.0.1:8080).

While it serves, ``DATA_DIR/server.json`` holds ``{"url", "pid"}``: other commands (``vlmrag ingest``)
find the running server there and go through its API when the embedded store is locked by it. The
file is written once the socket listens and removed on shutdown.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

import uvicorn

from server.settings import Settings

log = logging.getLogger(__name__)

RUN_FILE_NAME = "server.json"


def run_file_path(settings: Settings) -> Path:
    """Where a running server announces itself."""
    return Path(settings.data_dir) / RUN_FILE_NAME


def read_run_file(settings: Settings) -> dict[str, Any] | None:
    """``{"url", "pid"}`` of the server running on this data dir, or None (absent, stale or unreadable)."""
    try:
        info = json.loads(run_file_path(settings).read_text(encoding="utf-8"))
        os.kill(int(info["pid"]), 0)  # signal 0: does the process still exist?
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info


def _client_host(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


class AnnouncingServer(uvicorn.Server):
    """uvicorn.Server that writes the run file once listening and removes it when done."""

    def __init__(self, config: uvicorn.Config, run_file: Path) -> None:
        super().__init__(config)
        self.run_file = run_file
        self.url: str | None = None

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if not self.started or not self.servers:
            return
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        shown = _client_host(str(host))
        self.url = f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"
        self.run_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.run_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"url": self.url, "pid": os.getpid()}), encoding="utf-8")
        tmp.replace(self.run_file)  # atomic: readers never see half a file
        log.info("vlmrag serving at %s", self.url)

    async def shutdown(self, sockets: Any = None) -> None:
        # Here, not after run(): uvicorn re-raises SIGTERM/SIGINT once it has shut down, which ends
        # the process before any code after run() could clean up.
        try:
            await super().shutdown(sockets)
        finally:
            self.remove_run_file()

    def remove_run_file(self) -> None:
        try:
            info = json.loads(self.run_file.read_text(encoding="utf-8"))
            if info.get("pid") == os.getpid():  # never remove another server's announcement
                self.run_file.unlink()
        except (OSError, ValueError):
            pass


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="Run the HTTP API (OpenAI-compatible chat, search, snippets).")
    parser.add_argument("--host", help="Bind address (default: VLMRAG_HOST or 127.0.0.1).")
    parser.add_argument("--port", type=int, help="Port (default: VLMRAG_PORT or 8080; 0 picks a free one).")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Serve until interrupted (SIGINT/SIGTERM: in-flight requests get ``shutdown_grace_s``; uvicorn then
    re-raises the signal, so the exit status is the signal's)."""
    from server.app import create_app  # imported late: `vlmrag --help` stays fast

    updates = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = settings.model_copy(update=updates)
    config = uvicorn.Config(
        create_app(settings), host=settings.host, port=settings.port, lifespan="on",
        log_level=settings.log_level.lower(), timeout_graceful_shutdown=int(settings.shutdown_grace_s),
        proxy_headers=False,
    )
    server = AnnouncingServer(config, run_file_path(settings))
    try:
        server.run()
    finally:
        server.remove_run_file()
    # uvicorn leaves started False when the lifespan failed (e.g. the store is locked)
    return 0 if server.started else 1
