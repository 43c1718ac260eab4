"""Browser fixtures: Debian's headless Chromium driven by Playwright (sync API).

Names are a contract for tests/browser/: ``chromium_executable`` (session, str),
``chromium`` (module, playwright Browser), ``open_page`` (factory: ``open_page(width, height)``
-> Page, closed at teardown; uncaught page errors fail the test), ``screenshot_dir`` (session, Path
under artifacts/screenshots/), ``start_server`` (factory: ``start_server(**setting_overrides)`` ->
a fresh, empty vlmrag under real uvicorn answering with the real tiny vLLM; stopped at teardown).

Playwright's own browser download does not work on these machines, so the system Chromium is
launched by path. Without it the tests skip with a reason, except in CI (``CI`` set), where a
missing browser is a failure: CI installs it (``make browser``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.fixtures_server import LiveServer, UvicornThread
from tests.support.settings import make_settings
from tests.support.vllm_server import VLLMServer, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
)
DESKTOP = (1280, 800)
PHONE = (390, 844)

OpenPage = Callable[..., "object"]
StartServer = Callable[..., LiveServer]


def find_chromium() -> str | None:
    """Path of a Chromium binary: $VLMRAG_CHROMIUM, /usr/bin/chromium, or `chromium` on PATH."""
    for candidate in (os.environ.get("VLMRAG_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="session")
def chromium_executable() -> str:
    """The system Chromium, or skip (fail in CI) with the reason."""
    path = find_chromium()
    if path is None:
        reason = ("no Chromium at /usr/bin/chromium (install Debian's `chromium`: `make browser`, "
                  "or set VLMRAG_CHROMIUM)")
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser tests: {reason}")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="module")
def chromium(chromium_executable: str) -> Iterator[object]:
    """One headless Chromium per test module (Playwright sync API).

    Module scope, not session: while the sync API is open its event loop counts as running in this
    thread (it lives in a greenlet), so no asyncio test or fixture can run until it is closed. Keep
    async fixtures out of browser test modules.
    """
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_executable, args=list(CHROMIUM_ARGS))
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def open_page(chromium: object) -> Iterator[OpenPage]:
    """Factory: ``open_page(width=1280, height=800)`` -> a Page in a fresh context (own storage).

    Uncaught JavaScript errors on any opened page fail the test at teardown, so a broken module
    cannot hide behind an assertion that happens to pass.
    """
    contexts: list[object] = []
    errors: list[str] = []

    def factory(width: int = DESKTOP[0], height: int = DESKTOP[1]) -> object:
        context = chromium.new_context(viewport={"width": width, "height": height})  # type: ignore[attr-defined]
        context.set_default_timeout(30_000)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda exc: errors.append(f"{exc}"))
        return page

    yield factory
    for context in contexts:
        context.close()  # type: ignore[attr-defined]
    assert not errors, f"uncaught JavaScript errors: {errors}"


@pytest.fixture(scope="session")
def screenshot_dir() -> Path:
    """artifacts/screenshots/ under the repo (git-ignored; CI keeps it as an artifact)."""
    path = REPO_ROOT / "artifacts" / "screenshots"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def start_server(
    vllm_server: VLLMServer, tmp_path_factory: pytest.TempPathFactory, tiny_clip_config: Path
) -> Iterator[StartServer]:
    """Factory: ``start_server(**overrides)`` -> a fresh vlmrag (empty knowledge base) on loopback.

    For tests that need their own settings (small upload limits, auth on) or a knowledge base
    nobody else writes to; the session's shared ``live_server`` serves the rest.
    """
    servers: list[UvicornThread] = []

    def factory(**overrides: object) -> LiveServer:
        from server.app import create_app  # heavy imports only when a server is wanted

        settings = make_settings(
            tmp_path_factory.mktemp("browser_data"), tiny_clip_config, vllm_url=[vllm_server.url],
            vllm_model=vllm_server.served_model_name, vllm_deadline_s=60.0, vllm_retry_attempts=3,
            **overrides,
        )
        thread = UvicornThread(create_app(settings), free_port())
        thread.start()
        servers.append(thread)
        return LiveServer(f"http://127.0.0.1:{thread.server.config.port}", settings, vllm_server, [])

    yield factory
    for thread in servers:
        thread.stop()
