"""Fetch remote image URLs from chat messages, safely (off by default).

Refused unless ``settings.remote_images_enabled``. When enabled, every hop of a fetch is checked
*before* any connection is made:

* ``http``/``https`` only, no ``user:pass@``, the host on ``settings.remote_image_hosts`` (exact
  names, ``*.example.com`` for subdomains, or ``*`` for any public host);
* the name is resolved once and *every* address must be public: loopback, private, link-local
  (cloud metadata 169.254.169.254), multicast, reserved, unspecified, CGNAT and IPv4 addresses
  hidden in IPv6 (mapped, 6to4, Teredo, NAT64) are refused;
* the connection goes to the checked address itself (URL host replaced by the IP, ``Host`` header
  and TLS SNI/certificate name kept), so a second DNS answer cannot rebind it elsewhere;
* redirects are followed by hand, at most ``MAX_REDIRECTS``, each target checked like the first;
* the body is streamed and cut off past ``settings.limit_image_bytes``; the whole fetch, redirects
  included, must finish within ``settings.remote_image_timeout_s``.

Failures raise ``InvalidInput`` (400, code ``remote_image_refused``/``remote_image_fetch_failed``) or
``PayloadTooLarge`` (413): the URL is the caller's input, so its problems are the caller's errors.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urljoin, urlsplit

import httpx

from retriever.errors import InvalidInput, PayloadTooLarge
from retriever.images import parse_data_url
from server.settings import Settings

MAX_REDIRECTS = 3
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]
AddressPolicy = Callable[[Address], bool]


def _refused(message: str) -> InvalidInput:
    return InvalidInput(message, param="image_url", code="remote_image_refused")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, 6to4, Teredo, NAT64), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public_address(ip: Address) -> bool:
    """True only for globally routable unicast addresses (nothing internal, nothing special)."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None and not is_public_address(inner):
            return False
    if ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast:
        return False
    if ip.is_reserved or ip.is_unspecified or (isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT):
        return False
    return ip.is_global


async def resolve_host(host: str, port: int) -> list[str]:
    """All addresses ``host`` resolves to (the system resolver, off the event loop)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def host_allowed(host: str, allowed: list[str]) -> bool:
    """``host`` matches an allow-list entry: exact, ``*.domain`` (subdomains only) or ``*``."""
    host = host.lower().rstrip(".")
    for entry in (e.strip().lower().rstrip(".") for e in allowed):
        if entry == "*" or entry == host:
            return True
        if entry.startswith("*.") and host.endswith(entry[1:]):
            return True
    return False


def _split(url: str, settings: Settings) -> tuple[str, str, int]:
    """Check scheme, credentials and allow-list; returns (scheme, host, port)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _refused(f"malformed image URL: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise _refused(f"image URL scheme {scheme or 'missing'!r} is not allowed (http or https only)")
    if parts.username is not None or parts.password is not None:
        raise _refused("image URLs with credentials are not allowed")
    host = (parts.hostname or "").lower()
    if not host:
        raise _refused("image URL has no host")
    if not host_allowed(host, settings.remote_image_hosts):
        raise _refused(f"image host {host!r} is not on the allow-list (VLMRAG_REMOTE_IMAGE_HOSTS)")
    return scheme, host, port or (443 if scheme == "https" else 80)


async def _pinned_address(host: str, port: int, resolver: Resolver, policy: AddressPolicy) -> Address:
    """Resolve ``host`` and return its first address, refusing if *any* address fails ``policy``."""
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            found = await resolver(host, port)
        except OSError as exc:
            raise InvalidInput(f"image host {host!r} does not resolve", param="image_url",
                               code="remote_image_fetch_failed") from exc
        addresses = [ipaddress.ip_address(a.split("%", 1)[0]) for a in found]
        if not addresses:
            raise InvalidInput(f"image host {host!r} does not resolve", param="image_url",
                               code="remote_image_fetch_failed")
    bad = [a for a in addresses if not policy(a)]
    if bad:
        raise _refused(f"image host {host!r} resolves to a non-public address ({bad[0]}); refused")
    return addresses[0]


def _pinned_request(client: httpx.AsyncClient, url: str, scheme: str, host: str, port: int,
                    address: Address) -> httpx.Request:
    """A GET to ``address`` that still names ``host`` (Host header, TLS SNI and certificate check)."""
    # Only scheme/host/port change; path and query travel unchanged.
    target = httpx.URL(url).copy_with(scheme=scheme, host=str(address), port=port)
    default_port = 443 if scheme == "https" else 80
    host_header = host if port == default_port else f"{host}:{port}"
    extensions = {"sni_hostname": host} if scheme == "https" else {}
    return client.build_request("GET", target, headers={"Host": host_header, "Accept": "image/*"},
                                extensions=extensions)


async def _read_limited(response: httpx.Response, limit: int) -> bytes:
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"remote image is {declared} bytes, the limit is {limit}", param="image_url")
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:  # cut off: never buffer more than the limit (plus one chunk)
            raise PayloadTooLarge(f"remote image exceeds the limit of {limit} bytes", param="image_url")
        chunks.append(chunk)
    return b"".join(chunks)


async def _fetch(url: str, settings: Settings, client: httpx.AsyncClient, resolver: Resolver,
                 policy: AddressPolicy) -> bytes:
    for _hop in range(MAX_REDIRECTS + 1):
        scheme, host, port = _split(url, settings)
        address = await _pinned_address(host, port, resolver, policy)
        request = _pinned_request(client, url, scheme, host, port, address)
        try:
            response = await client.send(request, stream=True, follow_redirects=False)
        except httpx.HTTPError as exc:
            raise InvalidInput(f"could not fetch image from {host!r}: {type(exc).__name__}",
                               param="image_url", code="remote_image_fetch_failed") from exc
        try:
            if response.status_code in _REDIRECTS:
                location = response.headers.get("location")
                if not location:
                    raise InvalidInput("image URL redirected without a Location", param="image_url",
                                       code="remote_image_fetch_failed")
                url = urljoin(url, location)  # relative to the original name, not the pinned IP
                continue
            if response.status_code != 200:
                raise InvalidInput(f"image URL answered HTTP {response.status_code}", param="image_url",
                                   code="remote_image_fetch_failed")
            return await _read_limited(response, settings.limit_image_bytes)
        except httpx.HTTPError as exc:
            raise InvalidInput(f"could not fetch image from {host!r}: {type(exc).__name__}",
                               param="image_url", code="remote_image_fetch_failed") from exc
        finally:
            await response.aclose()
    raise _refused(f"image URL redirected more than {MAX_REDIRECTS} times")


async def fetch_remote_image(
    url: str, settings: Settings, client: httpx.AsyncClient, *,
    resolver: Resolver = resolve_host, address_policy: AddressPolicy = is_public_address,
) -> bytes:
    """The bytes behind ``url`` under every check in the module docstring.

    Args:
        resolver: host, port -> addresses; injected by tests to map fake names to addresses.
        address_policy: which resolved addresses may be contacted; tests widen it to one loopback
            test server, production keeps ``is_public_address``.
    """
    if not settings.remote_images_enabled:
        raise _refused("remote image URLs are disabled; send the image inline as a data URL "
                       "(or enable VLMRAG_REMOTE_IMAGES_ENABLED with VLMRAG_REMOTE_IMAGE_HOSTS)")
    try:
        async with asyncio.timeout(settings.remote_image_timeout_s):
            return await _fetch(url, settings, client, resolver, address_policy)
    except TimeoutError as exc:
        raise InvalidInput(f"fetching the image took longer than {settings.remote_image_timeout_s:g}s",
                           param="image_url", code="remote_image_fetch_failed") from exc


async def image_bytes_from_url(url: str, settings: Settings, client: httpx.AsyncClient | None) -> bytes:
    """Bytes of an ``image_url``: a ``data:`` URL inline, or a remote URL when enabled (else 400)."""
    stripped = url.strip()
    scheme = stripped.split(":", 1)[0].lower() if ":" in stripped else ""
    if scheme in ("http", "https") and settings.remote_images_enabled and client is not None:
        return await fetch_remote_image(stripped, settings, client)
    return parse_data_url(stripped, max_bytes=settings.limit_image_bytes)[1]


def build_remote_image_client(settings: Settings) -> httpx.AsyncClient:
    """The httpx client for remote images: no env proxies, no automatic redirects, short timeouts."""
    timeout = httpx.Timeout(settings.remote_image_timeout_s, connect=min(3.0, settings.remote_image_timeout_s))
    return httpx.AsyncClient(
        timeout=timeout, follow_redirects=False, trust_env=False,
        limits=httpx.Limits(max_connections=32, max_keepalive_connections=0),  # pinned IPs: no reuse
        headers={"User-Agent": "vlmrag-image-fetcher"},
    )
