"""API keys and scopes: who may call which route.

Keys come from ``VLMRAG_API_KEYS`` (``settings.api_keys``): entries separated by commas or newlines,
each ``SCOPES[@KBS]:SECRET`` where ``SCOPES`` is ``chat``, ``admin`` or ``chat+admin``, ``KBS`` the
knowledge bases the key may use (``chat@pumps,valves:…``; no ``@`` or ``@*``: every one) and ``SECRET`` is

* ``sha256:<64 hex>`` — the SHA-256 of the key (preferred: the config never holds the key), or
* the plain key itself (handy for development; at least 16 characters recommended).

``@/path/to/file`` instead of entries reads them from a file (one per line, ``#`` comments and
blank lines ignored), e.g. a Kubernetes secret mounted as a volume. ``vlmrag keygen`` prints a new
key and its hashed entry. Example::

    VLMRAG_API_KEYS="chat:sha256:9f86d0...,admin:sha256:2c26b4..."

Clients send the key as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``. Scopes: ``chat``
(chat, ask, search, models) and ``admin`` (ingest, delete, stats); ``admin`` implies ``chat``.
No/unknown key -> 401 (``Unauthorized``), key without the scope -> 403 (``Forbidden``).
Keys are compared by their SHA-256 with ``hmac.compare_digest`` and never logged; a key is named in
logs and rate-limit buckets only by a short prefix of its hash (``key_id``).

Auth can be switched off only with ``VLMRAG_AUTH_DISABLED=true``; then every request passes with
all scopes and is identified by its client IP. ``check_auth_config(settings)`` refuses to start with
auth on and no keys, and warns loudly when auth is off on a non-loopback host.

The app's lifespan builds one ``AccessControl`` (the key registry plus the rate limiters,
``build_access_control``) and keeps it in ``AppState.access``; the dependencies read it through
``get_access_control``, which tests of a bare FastAPI app replace with ``app.dependency_overrides``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from retriever.errors import ConfigurationError, Forbidden, Unauthorized
from server.ratelimit import BUCKETS, RateLimiters
from server.settings import Settings

if TYPE_CHECKING:  # server.state imports the services (and torch); `vlmrag keygen` imports this module
    from server.state import AppState

log = logging.getLogger(__name__)

SCOPES = ("chat", "admin")
# A scope grants itself plus these.
_IMPLIED = {"admin": frozenset({"admin", "chat"}), "chat": frozenset({"chat"})}
_HEX = frozenset("0123456789abcdef")
_MIN_PLAIN_KEY_CHARS = 16
_KB_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,47}$")  # server/knowledge_bases.py::NAME_RE


def hash_key(key: str) -> str:
    """Hex SHA-256 of an API key, the form stored in config."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller of a request: a key (by hash prefix) or, with auth off, a client address."""

    key_id: str  # "key:<12 hex of the hash>" or "ip:<address>"; safe to log, used as rate-limit key
    scopes: frozenset[str]
    kbs: tuple[str, ...] | None = None  # the knowledge bases it is bound to, in order; None = every one

    def has(self, scope: str) -> bool:
        return scope in self.scopes

    def may_use(self, kb: str) -> bool:
        return self.kbs is None or kb in self.kbs


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One configured key: its SHA-256 digest, the scopes it grants (implications expanded), its KBs."""

    digest: bytes
    scopes: frozenset[str]
    kbs: tuple[str, ...] | None = None  # None: every knowledge base (an entry without ``@``, or ``@*``)

    @property
    def key_id(self) -> str:
        return "key:" + self.digest.hex()[:12]


class KeyRegistry:
    """The configured keys; ``authenticate`` maps a presented key to a Principal or None."""

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self._keys = tuple(keys)

    def __len__(self) -> int:
        return len(self._keys)

    def authenticate(self, presented: str) -> Principal | None:
        """The Principal for ``presented``, or None; compares every entry so timing says nothing."""
        digest = hashlib.sha256(presented.encode("utf-8")).digest()
        found: ApiKey | None = None
        for key in self._keys:
            if hmac.compare_digest(digest, key.digest) and found is None:
                found = key
        return Principal(found.key_id, found.scopes, found.kbs) if found else None


def _parse_scopes(text: str, where: str) -> frozenset[str]:
    names = [s.strip().lower() for s in text.split("+") if s.strip()]
    if not names:
        raise ConfigurationError(f"API key entry {where}: missing scope (use chat, admin or chat+admin)")
    scopes: set[str] = set()
    for name in names:
        if name not in _IMPLIED:
            raise ConfigurationError(
                f"API key entry {where}: unknown scope {name!r} (allowed: {', '.join(SCOPES)})"
            )
        scopes |= _IMPLIED[name]
    return frozenset(scopes)


def parse_key_entry(entry: str, where: str = "") -> ApiKey:
    """Parse one ``SCOPES:sha256:<hex>`` or ``SCOPES:<plain key>`` entry (messages never echo the key)."""
    scope_text, sep, secret = entry.partition(":")
    if not sep or not secret.strip():
        raise ConfigurationError(
            f"API key entry {where}: expected 'SCOPES:sha256:<hex>' or 'SCOPES:<key>' "
            "(e.g. 'chat:sha256:...'; run `vlmrag keygen`)"
        )
    scope_text, at, kb_text = scope_text.partition("@")
    scopes = _parse_scopes(scope_text, where)
    kbs = _parse_kbs(kb_text, where) if at else None
    secret = secret.strip()
    if secret.lower().startswith("sha256:"):
        hexdigest = secret[len("sha256:"):].strip().lower()
        if len(hexdigest) != 64 or not set(hexdigest) <= _HEX:
            raise ConfigurationError(f"API key entry {where}: sha256 hash must be 64 hex characters")
        return ApiKey(bytes.fromhex(hexdigest), scopes, kbs)
    if len(secret) < _MIN_PLAIN_KEY_CHARS:
        log.warning("API key entry %s is a plain key shorter than %d characters; use `vlmrag keygen`",
                    where, _MIN_PLAIN_KEY_CHARS)
    return ApiKey(hashlib.sha256(secret.encode("utf-8")).digest(), scopes, kbs)


def _parse_kbs(text: str, where: str) -> tuple[str, ...] | None:
    """``pumps,valves`` (or ``+``-separated) → ('pumps', 'valves'); ``*`` → None (every KB)."""
    names = [n.strip().lower() for n in text.replace("+", ",").split(",") if n.strip()]
    if not names:
        raise ConfigurationError(f"API key entry {where}: '@' must name knowledge bases (or '*' for all)")
    if "*" in names:
        return None
    for name in names:
        if not _KB_NAME.match(name):
            raise ConfigurationError(f"API key entry {where}: knowledge base name {name!r} is not valid")
    return tuple(dict.fromkeys(names))


def _split_entries(text: str) -> list[str]:
    """Entries separated by commas or newlines; ``#`` starts a comment line."""
    entries: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        pending = ""
        for part in (p.strip() for p in line.split(",")):
            if not part:
                continue
            # `chat@pumps,valves:sha256:…` lists KBs with commas: a piece without ':' continues the entry
            pending = f"{pending},{part}" if pending else part
            if ":" in part:
                entries.append(pending)
                pending = ""
        if pending:
            entries.append(pending)
    return entries


def parse_api_keys(spec: str) -> list[ApiKey]:
    """All keys from ``settings.api_keys``: inline entries or ``@path`` to a file of entries."""
    spec = spec.strip()
    source = "VLMRAG_API_KEYS"
    if spec.startswith("@"):
        path = Path(spec[1:].strip()).expanduser()
        try:
            spec = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigurationError(f"cannot read API keys file {path}: {exc.strerror or exc}") from exc
        source = str(path)
    return [parse_key_entry(entry, f"#{i} in {source}") for i, entry in enumerate(_split_entries(spec), 1)]


def build_key_registry(settings: Settings) -> KeyRegistry:
    """A KeyRegistry from the settings (empty when auth is disabled)."""
    return KeyRegistry([] if settings.auth_disabled else parse_api_keys(settings.api_keys))


def is_loopback_host(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'; anything else (0.0.0.0 included) is exposed."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_auth_config(settings: Settings) -> KeyRegistry:
    """Validate auth settings at startup and return the key registry (empty with auth off).

    Raises ConfigurationError when auth is on and no key is configured; logs a loud warning when
    auth is off and the server listens beyond loopback.
    """
    if settings.auth_disabled:
        if not is_loopback_host(settings.host):
            log.warning(
                "!!! AUTHENTICATION IS DISABLED (VLMRAG_AUTH_DISABLED=true) and vlmrag listens on %s: "
                "anyone who can reach this port can chat, ingest and delete. Set VLMRAG_API_KEYS "
                "(see `vlmrag keygen`) or bind to 127.0.0.1. !!!",
                settings.host,
            )
        else:
            log.info("authentication disabled (VLMRAG_AUTH_DISABLED=true); listening on loopback only")
        return KeyRegistry([])
    registry = build_key_registry(settings)
    if not len(registry):
        raise ConfigurationError(
            "no API keys configured: set VLMRAG_API_KEYS to 'chat:sha256:<hex>,admin:sha256:<hex>' "
            "entries or '@/path/to/keys-file' (create keys with `vlmrag keygen --scope chat`), "
            "or run without auth with VLMRAG_AUTH_DISABLED=true (local use only)"
        )
    log.info("authentication on: %d API key(s) configured", len(registry))
    return registry


def presented_key(request: Request) -> str | None:
    """The key in ``Authorization: Bearer`` or ``X-API-Key``, or None."""
    header = request.headers.get("authorization")
    if header:
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    token = request.headers.get("x-api-key", "").strip()
    return token or None


def client_address(request: Request) -> str:
    """The peer address (uvicorn's ``--proxy-headers`` decides whether X-Forwarded-For is trusted)."""
    return request.client.host if request.client else "unknown"


@dataclass(frozen=True, slots=True)
class AccessControl:
    """What the auth dependencies check: the keys (unless auth is off) and the rate limiters."""

    keys: KeyRegistry
    limiters: RateLimiters
    auth_disabled: bool


def build_access_control(settings: Settings) -> AccessControl:
    """The checked key registry and every rate-limit bucket; raises ConfigurationError like ``check_auth_config``."""
    return AccessControl(check_auth_config(settings), RateLimiters.from_settings(settings), settings.auth_disabled)


async def get_access_control(request: Request) -> AccessControl:
    """The app's AccessControl, built by the lifespan (``server.deps.AccessControlDep``)."""
    state: AppState = request.app.state.vlmrag
    return state.access


def authenticate(request: Request, scope: str, access: AccessControl) -> Principal:
    """The caller's Principal if it holds ``scope``; raises Unauthorized (401) or Forbidden (403)."""
    if access.auth_disabled:
        principal = Principal("ip:" + client_address(request), frozenset(SCOPES))
    else:
        key = presented_key(request)
        if key is None:
            raise Unauthorized(
                "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                code="missing_api_key",
            )
        found = access.keys.authenticate(key)
        if found is None:
            raise Unauthorized("invalid API key")
        principal = found
        if not principal.has(scope):
            raise Forbidden(f"this API key lacks the '{scope}' scope")
    request.state.principal = principal
    return principal


def require_scope(scope: str, bucket: str = "default"):
    """A FastAPI dependency: authenticate the caller for ``scope``, then charge its rate-limit ``bucket``.

    ``bucket`` is ``"default"`` (``rate_limit_*``) or ``"media"`` (``rate_limit_media_*``, for cheap
    image reads). A failed authentication (401) is charged to the client address instead and
    becomes 429 once that address has failed too often (``rate_limit_auth_failures_*``).
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}")
    if bucket not in BUCKETS:
        raise ValueError(f"unknown rate-limit bucket {bucket!r} (known: {', '.join(BUCKETS)})")

    async def dependency(
        request: Request, access: Annotated[AccessControl, Depends(get_access_control)],
    ) -> Principal:
        try:
            principal = authenticate(request, scope, access)
        except Unauthorized:
            access.limiters.charge_auth_failure(client_address(request))  # 429 once over the budget
            raise
        access.limiters.charge(principal.key_id, bucket)
        return principal

    dependency.__name__ = f"require_{scope}_scope" + ("" if bucket == "default" else f"_{bucket}")
    return dependency


ChatAuth = Depends(require_scope("chat"))
AdminAuth = Depends(require_scope("admin"))
ChatMediaAuth = Depends(require_scope("chat", bucket="media"))  # snippet image/thumbnail GETs
