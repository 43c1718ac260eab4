"""API keys and scopes: parsing, hashing, files, disabled mode, and the 401/403/200 matrix over HTTP."""

from __future__ import annotations

import logging
import subprocess
import sys
from functools import partial
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from retriever.errors import ConfigurationError
from server.auth import (
    AdminAuth,
    ChatAuth,
    Principal,
    build_access_control,
    build_key_registry,
    check_auth_config,
    get_access_control,
    hash_key,
    is_loopback_host,
    parse_api_keys,
)
from server.commands.keygen import config_entry, generate_key
from server.errors import install_error_handlers
from server.settings import Settings
from tests.support.settings import bare_settings

CHAT_KEY = "chat-key-0123456789abcdef"
ADMIN_KEY = "admin-key-0123456789abcdef"
BOTH_KEY = "both-key-0123456789abcdef"


_settings = partial(bare_settings, api_keys=f"chat:sha256:{hash_key(CHAT_KEY)},admin:{ADMIN_KEY}",
                    rate_limit_rps=1000.0, rate_limit_burst=1000)


def _mini_app(settings: Settings) -> FastAPI:
    """The real dependencies and error handlers on two routes, one per scope."""
    app = FastAPI()
    access = build_access_control(settings)  # what the lifespan of the real app keeps in AppState
    app.dependency_overrides[get_access_control] = lambda: access
    install_error_handlers(app)

    @app.get("/chat")
    async def chat(principal: Principal = ChatAuth) -> dict[str, object]:
        return {"who": principal.key_id, "scopes": sorted(principal.scopes)}

    @app.get("/admin")
    async def admin(principal: Principal = AdminAuth) -> dict[str, object]:
        return {"who": principal.key_id}

    return app


async def _get(app: FastAPI, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.get(path, headers=headers or {})


def test_parse_hash_and_plain_entries_expand_admin() -> None:
    keys = parse_api_keys(f"chat:sha256:{hash_key(CHAT_KEY).upper()}, admin:{ADMIN_KEY}\nchat+admin:{BOTH_KEY}")
    assert [sorted(k.scopes) for k in keys] == [["chat"], ["admin", "chat"], ["admin", "chat"]]
    registry = build_key_registry(_settings(api_keys=f"chat:sha256:{hash_key(CHAT_KEY)}"))
    principal = registry.authenticate(CHAT_KEY)
    assert principal is not None and principal.scopes == {"chat"}
    assert principal.key_id == "key:" + hash_key(CHAT_KEY)[:12]
    assert registry.authenticate(CHAT_KEY + "x") is None
    assert registry.authenticate("") is None


@pytest.mark.parametrize("spec, fragment", [
    ("chat", "expected"),
    ("root:some-long-plain-key-123", "unknown scope 'root'"),
    ("chat:sha256:abc", "64 hex"),
    (f"chat:sha256:{'g' * 64}", "64 hex"),
    (":plain-key-long-enough-123", "missing scope"),
    ("@/nonexistent/keys.txt", "cannot read API keys file /nonexistent/keys.txt"),
])
def test_bad_entries_are_configuration_errors_that_never_echo_the_key(spec: str, fragment: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_api_keys(spec)
    assert fragment in info.value.message
    assert "some-long-plain-key" not in info.value.message


def test_keys_from_file_with_comments(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# chat bot\nchat:sha256:{hash_key(CHAT_KEY)}\n\n  admin:{ADMIN_KEY}  \n")
    registry = build_key_registry(_settings(api_keys=f"@{keys_file}"))
    assert len(registry) == 2
    admin = registry.authenticate(ADMIN_KEY)
    assert admin is not None and admin.has("chat") and admin.has("admin")


def test_startup_refuses_auth_without_keys() -> None:
    with pytest.raises(ConfigurationError) as info:
        check_auth_config(_settings(api_keys=""))
    assert "VLMRAG_API_KEYS" in info.value.message and "VLMRAG_AUTH_DISABLED=true" in info.value.message


def test_disabled_auth_warns_loudly_only_off_loopback(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="server.auth"):
        check_auth_config(_settings(api_keys="", auth_disabled=True, host="127.0.0.1"))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="server.auth"):
        check_auth_config(_settings(api_keys="", auth_disabled=True, host="0.0.0.0"))
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "AUTHENTICATION IS DISABLED" in warnings[0].getMessage()


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.9.9.9", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("vlmrag.example.com", False),
])
def test_is_loopback_host(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def test_keys_are_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    short = "short-plain"
    with caplog.at_level(logging.DEBUG):
        check_auth_config(_settings(api_keys=f"chat:{short},admin:{ADMIN_KEY}"))
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "shorter than" in text  # the weak key is reported…
    assert short not in text and ADMIN_KEY not in text  # …but never shown


# --- over HTTP ---------------------------------------------------------------------------------

MATRIX = [
    # headers, /chat status, /admin status
    ({}, 401, 401),
    ({"Authorization": "Bearer wrong-key-0123456789"}, 401, 401),
    ({"Authorization": f"Basic {CHAT_KEY}"}, 401, 401),
    ({"Authorization": f"Bearer {CHAT_KEY}"}, 200, 403),
    ({"X-API-Key": CHAT_KEY}, 200, 403),
    ({"Authorization": f"Bearer {ADMIN_KEY}"}, 200, 200),
    ({"authorization": f"bearer {ADMIN_KEY}"}, 200, 200),
    ({"X-API-Key": ADMIN_KEY}, 200, 200),
]


@pytest.mark.parametrize("headers, chat_status, admin_status", MATRIX)
async def test_scope_matrix(headers: dict[str, str], chat_status: int, admin_status: int) -> None:
    app = _mini_app(_settings())
    for path, expected in (("/chat", chat_status), ("/admin", admin_status)):
        response = await _get(app, path, headers)
        assert response.status_code == expected, (path, headers, response.text)
        if expected != 200:
            error = response.json()["error"]
            assert error["type"] == {401: "authentication_error", 403: "permission_error"}[expected]
            assert CHAT_KEY not in response.text and ADMIN_KEY not in response.text


async def test_disabled_mode_passes_everything_keyed_by_ip() -> None:
    app = _mini_app(_settings(api_keys="", auth_disabled=True))
    for path in ("/chat", "/admin"):
        response = await _get(app, path, {"Authorization": "Bearer anything"})
        assert response.status_code == 200
    body = (await _get(app, "/chat")).json()
    assert body["who"].startswith("ip:") and body["scopes"] == ["admin", "chat"]


def test_keygen_entry_authenticates() -> None:
    key = generate_key()
    assert key.startswith("vlmrag-") and len(key) > 40 and generate_key() != key
    registry = build_key_registry(_settings(api_keys=config_entry(key, "admin")))
    principal = registry.authenticate(key)
    assert principal is not None and principal.scopes == {"admin", "chat"}


@pytest.mark.subprocess
def test_keygen_cli_prints_key_and_hash_entry() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "server.cli", "keygen", "--scope", "chat", "--quiet"],
        capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1],
    ).stdout.split()
    key, entry = out
    assert entry == f"chat:sha256:{hash_key(key)}"


# --- the real app -------------------------------------------------------------------------------

# (method, path, request kwargs, scope needed); bodies are valid so an authorised call gets past auth.
ROUTES = [
    ("GET", "/v1/models", {}, "chat"),
    ("POST", "/v1/search", {"json": {"text": "router reset"}}, "chat"),
    ("POST", "/v1/chat/completions", {"json": {"model": "vlmrag", "messages": [{"role": "user", "content": "hi"}]}},
     "chat"),
    ("POST", "/v1/ask", {"data": {"question": "hi"}}, "chat"),
    ("GET", "/v1/snippets", {}, "chat"),
    ("GET", "/v1/stats", {}, "admin"),
    ("POST", "/v1/snippets", {"data": {"text": "a snippet", "source": "t.txt"}}, "admin"),
    ("DELETE", "/v1/snippets/00000000-0000-0000-0000-000000000000", {}, "admin"),
]


@pytest.fixture
def auth_app(settings: Settings, knowledge_base: object, fake_vllm: object) -> FastAPI:
    import httpx as _httpx

    from server.app import create_app

    keys = f"chat:sha256:{hash_key(CHAT_KEY)},admin:sha256:{hash_key(ADMIN_KEY)}"
    # 16 failed authentications from one address below: not an auth-failure rate-limit test.
    changed = settings.model_copy(update={"auth_disabled": False, "api_keys": keys, "rate_limit_burst": 1000,
                                          "rate_limit_auth_failures_burst": 1000})
    return create_app(changed, knowledge_base=knowledge_base, vllm_transport=_httpx.MockTransport(fake_vllm))


async def test_real_app_scope_matrix(auth_app: FastAPI) -> None:
    from tests.support.fixtures_server import running_client

    async with running_client(auth_app) as client:
        for method, path, kwargs, scope in ROUTES:
            for headers, allowed in (
                ({}, None), ({"Authorization": "Bearer not-a-key-0123456789"}, None),
                ({"Authorization": f"Bearer {CHAT_KEY}"}, scope == "chat"),
                ({"X-API-Key": ADMIN_KEY}, True),
            ):
                response = await client.request(method, path, headers=headers, **kwargs)
                expected = {None: {401}, False: {403}}.get(allowed, {200, 201, 404})
                assert response.status_code in expected, (method, path, headers, response.text)
                if response.status_code >= 400:
                    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        # probes stay open: load balancers and Prometheus carry no keys
        assert (await client.get("/healthz")).status_code == 200


async def test_real_app_refuses_to_start_without_keys(settings: Settings, knowledge_base: object) -> None:
    from server.app import create_app
    from tests.support.fixtures_server import running_client

    app = create_app(settings.model_copy(update={"auth_disabled": False, "api_keys": ""}),
                     knowledge_base=knowledge_base)
    with pytest.raises(ConfigurationError, match="VLMRAG_API_KEYS"):
        async with running_client(app):
            pass


# --- failed authentication is rate limited per client address -----------------------------------

async def _get_from(app: FastAPI, address: str, path: str, headers: dict[str, str]) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, client=(address, 4321))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.get(path, headers=headers)


async def test_failed_auth_is_rate_limited_per_address_and_successes_are_not() -> None:
    # 1 failure/minute refills, 3 saved: the 4th failure within the minute is refused with 429.
    app = _mini_app(_settings(rate_limit_auth_failures_per_min=1.0, rate_limit_auth_failures_burst=3))
    wrong = {"Authorization": "Bearer wrong-key-0123456789"}
    statuses = [(await _get_from(app, "10.0.0.1", "/chat", wrong)).status_code for _ in range(3)]
    assert statuses == [401, 401, 401]
    refused = await _get_from(app, "10.0.0.1", "/chat", wrong)
    assert refused.status_code == 429, refused.text
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_error" and "failed authentication" in error["message"]
    assert (await _get_from(app, "10.0.0.1", "/admin", {})).status_code == 429  # a missing key is a failure too
    # the right key from the same address still works, and is charged only to its own bucket
    ok = [(await _get_from(app, "10.0.0.1", "/chat", {"X-API-Key": CHAT_KEY})).status_code for _ in range(5)]
    assert ok == [200] * 5
    # 403 is an authenticated caller, not a failed authentication
    assert (await _get_from(app, "10.0.0.1", "/admin", {"X-API-Key": CHAT_KEY})).status_code == 403
    # another address has its own failure budget
    assert (await _get_from(app, "10.0.0.2", "/chat", wrong)).status_code == 401


def test_auth_failure_limit_defaults() -> None:
    settings = _settings()
    assert (settings.rate_limit_auth_failures_per_min, settings.rate_limit_auth_failures_burst) == (10.0, 10)
