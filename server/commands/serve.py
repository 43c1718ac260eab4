"""``vlmrag serve [--host HOST] [--port PORT] [--workers N]``: run the API with uvicorn (default 127.0.0.1:8080).

``--workers N`` (``VLMRAG_WORKERS``) runs N processes on one socket under uvicorn's supervisor (it restarts
a dead one; SIGHUP replaces them one by one). One process runs CLIP on threads but its event loop,
JSON and SSE work on one core; N processes use N. The embedded store belongs to one process, so this
needs a Qdrant server (``VLMRAG_QDRANT_URL``). Each worker gets the parent's settings (passed in
``VLMRAG_SERVE_WORKER_SETTINGS``) with the per-process bounds divided by N, so the service as a whole
keeps the configured totals: rate limits, the model-call gate and queue, and CLIP threads
(``worker_settings``).

While it serves, ``DATA_DIR/server.json`` holds ``{"url", "pid"}``: other commands (``vlmrag ingest``)
find the running server there and go through its API when the embedded store is locked by it. The
file is written once the socket listens and removed on shutdown.

Before uvicorn starts, ``preflight`` checks what would otherwise fail the app's startup (no API
keys, CLIP weights missing, the embedded store held by another process): each failure is a
``VlmragError`` that ``server/cli.py`` prints as one line. A startup failure that still happens in
the lifespan is logged there as one line; the traceback uvicorn would print is suppressed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from retriever.errors import InvalidInput, StoreUnavailable, VlmragError
from server.settings import Settings

log = logging.getLogger(__name__)

RUN_FILE_NAME = "server.json"
WORKER_SETTINGS_ENV = "VLMRAG_SERVE_WORKER_SETTINGS"


def run_file_path(settings: Settings) -> Path:
    """Where a running server announces itself."""
    return Path(settings.data_dir) / RUN_FILE_NAME


def read_run_file(data_dir: Path) -> dict[str, Any] | None:
    """``{"url", "pid", ...}`` of the server running on ``data_dir``, or None (absent, stale or unreadable)."""
    try:
        info = json.loads((Path(data_dir) / RUN_FILE_NAME).read_text(encoding="utf-8"))
        str(info["url"])
        pid = int(info.get("pid", 0))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if pid > 0:
        try:
            os.kill(pid, 0)  # signal 0: does the process still exist?
        except ProcessLookupError:
            return None  # stale file from a server that died
        except PermissionError:
            pass  # alive, owned by someone else
    return info


def _client_host(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def client_url(sockname: Any) -> str:
    """The URL a client on this machine reaches a socket bound to ``sockname`` (host, port, ...) at."""
    host, port = sockname[:2]
    shown = _client_host(str(host))
    return f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"


def announce(run_file: Path, url: str, **extra: Any) -> None:
    """Write the run file ``{"url", "pid", **extra}`` atomically: readers never see half a file."""
    run_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = run_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"url": url, "pid": os.getpid(), **extra}), encoding="utf-8")
    tmp.replace(run_file)


def withdraw(run_file: Path) -> None:
    """Remove the run file if this process wrote it (never another server's announcement)."""
    try:
        if json.loads(run_file.read_text(encoding="utf-8")).get("pid") == os.getpid():
            run_file.unlink()
    except (OSError, ValueError):
        pass


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
        self.url = client_url(self.servers[0].sockets[0].getsockname())
        announce(self.run_file, self.url)
        log.info("vlmrag serving at %s", self.url)

    async def shutdown(self, sockets: Any = None) -> None:
        # Here, not after run(): uvicorn re-raises SIGTERM/SIGINT once it has shut down, which ends
        # the process before any code after run() could clean up.
        try:
            await super().shutdown(sockets)
        finally:
            self.remove_run_file()

    def remove_run_file(self) -> None:
        withdraw(self.run_file)


def preflight(settings: Settings) -> None:
    """Raise the VlmragError the app's startup would hit: auth config, store lock, CLIP weights."""
    from server.auth import check_auth_config  # fastapi: imported late like create_app

    check_auth_config(settings)
    if not settings.qdrant_url:
        from retriever.store.edge import check_not_locked

        try:
            check_not_locked(settings.embedded_store_path, settings.collection)
        except StoreUnavailable as exc:
            running = read_run_file(settings.data_dir)
            if running is None:
                raise
            raise StoreUnavailable(f"{exc.message}; vlmrag already serves this data dir at {running['url']}") from None
    from retriever.embedder import check_embedder_available  # torch: only once the cheap checks passed

    check_embedder_available(settings.clip_model, settings.clip_pretrained, settings.clip_device)


def startup_error(app: Any) -> VlmragError | None:
    """The VlmragError that failed the app's lifespan (already logged as one line), if any."""
    error = getattr(getattr(app, "state", None), "startup_error", None)
    return error if isinstance(error, VlmragError) else None


class BriefStartupFailure:
    """ASGI wrapper: a startup failure the lifespan logged as one line is not repeated as a traceback.

    Starlette reports a failed lifespan to uvicorn with the formatted traceback as the message,
    which uvicorn logs (~60 lines); the message is dropped when it is one of our errors.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def brief_send(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed" and startup_error(self.app) is not None:
                message = {"type": message["type"], "message": ""}
            await send(message)

        await self.app(scope, receive, brief_send)


def worker_settings(settings: Settings, workers: int) -> Settings:
    """One worker's share of the per-process bounds, so ``workers`` processes keep the configured totals.

    Requests spread over the workers as the kernel hands out connections, so a per-key limit holds on
    average, not exactly.
    """
    def share(value: int, floor: int = 1) -> int:
        return max(floor, math.ceil(value / workers))

    return settings.model_copy(update={
        "rate_limit_rps": settings.rate_limit_rps / workers, "rate_limit_burst": share(settings.rate_limit_burst),
        "rate_limit_kb_rps": settings.rate_limit_kb_rps / workers,
        "rate_limit_kb_burst": share(settings.rate_limit_kb_burst),
        "rate_limit_media_rps": settings.rate_limit_media_rps / workers,
        "rate_limit_media_burst": share(settings.rate_limit_media_burst),
        "max_concurrent_model_calls": share(settings.max_concurrent_model_calls),
        "max_queued_model_calls": share(settings.max_queued_model_calls, 0),
        "clip_threads": settings.clip_threads or max(1, (os.cpu_count() or 1) // workers),
        "workers": 1,
    })


def worker_app() -> ASGIApp:
    """App factory of a ``--workers`` process (``server.commands.serve:worker_app``): the parent's settings."""
    from server.app import create_app

    try:
        settings = Settings.model_validate_json(os.environ[WORKER_SETTINGS_ENV])
    except (KeyError, ValueError) as exc:  # a startup failure: the supervisor stops instead of restarting it
        log.error("worker settings unreadable from %s: %s", WORKER_SETTINGS_ENV, exc)
        sys.exit(STARTUP_FAILURE)
    return BriefStartupFailure(create_app(settings))


def check_workers(settings: Settings, workers: int) -> None:
    url = settings.qdrant_url.strip()
    if workers > 1 and (not url or url.startswith("local:")):
        raise InvalidInput(
            f"--workers {workers} needs a Qdrant server (VLMRAG_QDRANT_URL): the "
            f"{'embedded store' if not url else 'qdrant-client local store'} belongs to one process. "
            "Run one process, or point VLMRAG_QDRANT_URL at a Qdrant server", param="workers")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="Run the HTTP API (OpenAI-compatible chat, search, snippets).")
    parser.add_argument("--host", help="Bind address (default: VLMRAG_HOST or 127.0.0.1).")
    parser.add_argument("--port", type=int, help="Port (default: VLMRAG_PORT or 8080; 0 picks a free one).")
    parser.add_argument("--workers", type=int, help="Processes (default: VLMRAG_WORKERS or 1; >1 needs a Qdrant server).")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Serve until interrupted (SIGINT/SIGTERM: in-flight requests get ``shutdown_grace_s``; uvicorn then
    re-raises the signal, so the exit status is the signal's)."""
    from server.app import create_app  # imported late: `vlmrag --help` stays fast

    updates = {k: v for k, v in (("host", args.host), ("port", args.port), ("workers", getattr(args, "workers", None)))
               if v is not None}
    settings = settings.model_copy(update=updates)
    if settings.workers < 1:
        raise InvalidInput("--workers must be at least 1", param="workers")
    check_workers(settings, settings.workers)
    preflight(settings)
    if settings.workers > 1:
        return _run_workers(settings)
    app = create_app(settings)
    config = uvicorn.Config(
        BriefStartupFailure(app), host=settings.host, port=settings.port, lifespan="on",
        log_level=settings.log_level.lower(), timeout_graceful_shutdown=int(settings.shutdown_grace_s),
        proxy_headers=False,
    )
    server = AnnouncingServer(config, run_file_path(settings))
    try:
        server.run()
    except SystemExit as exc:
        # uvicorn exits 3 when startup failed (lifespan, bind) after logging why in a line: map it like cli.py
        if exc.code != STARTUP_FAILURE:
            raise
        return 2 if isinstance(startup_error(app), InvalidInput) else 1
    finally:
        server.remove_run_file()
    return 0 if server.started else 1


def _run_workers(settings: Settings) -> int:
    """N uvicorn workers on one socket under uvicorn's supervisor; the run file names the parent."""
    config = uvicorn.Config(
        "server.commands.serve:worker_app", factory=True, host=settings.host, port=settings.port, lifespan="on",
        workers=settings.workers, log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=int(settings.shutdown_grace_s), proxy_headers=False,
    )
    sock = config.bind_socket()
    port = sock.getsockname()[1]
    shared = worker_settings(settings, settings.workers).model_copy(update={"port": port})  # port 0: the bound one
    os.environ[WORKER_SETTINGS_ENV] = shared.model_dump_json()
    url = client_url(sock.getsockname())
    run_file = run_file_path(settings)
    announce(run_file, url, workers=settings.workers)
    log.info("vlmrag serving at %s with %d workers", url, settings.workers)
    supervisor = Multiprocess(config, sockets=[sock])
    try:
        supervisor.run()
    finally:
        sock.close()
        withdraw(run_file)
    # the supervisor stops early when a worker failed before it served (STARTUP_FAILURE)
    failed = any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes)
    return 1 if failed else 0
