"""Remote image fetching: off by default, allow-list, SSRF refusals before connecting, redirects re-checked.

No traffic ever leaves loopback: refusals are checked with a recording transport that sends nothing,
and the fetch tests use a raw asyncio HTTP server on 127.0.0.1 behind a transport that refuses any
non-loopback destination (so even a bug here could not reach the network).
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator
from functools import partial

import httpx
import pytest
import pytest_asyncio

from retriever.errors import InvalidInput, PayloadTooLarge
from server.remote_images import (
    Address,
    fetch_remote_image,
    host_allowed,
    image_bytes_from_url,
    is_public_address,
)
from tests.support.media import data_url, noise_png
from tests.support.settings import bare_settings

PNG = noise_png(16, seed=0)


_settings = partial(bare_settings, remote_images_enabled=True, remote_image_hosts=["cdn.example"],
                    remote_image_timeout_s=2.0, limit_image_bytes=64 * 1024)


class Recorder:
    """A transport that records requests and answers a PNG without sending anything anywhere."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(200, content=PNG)

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self))


def fake_resolver(table: dict[str, list[str]]):
    calls: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        calls.append(host)
        if host not in table:
            raise OSError("no such host")
        return table[host]

    resolve.calls = calls  # type: ignore[attr-defined]
    return resolve


@pytest.mark.parametrize("ip", [
    "127.0.0.1", "::1", "0.0.0.0", "169.254.169.254", "10.1.2.3", "172.16.0.1", "192.168.1.1",
    "100.64.0.1", "224.0.0.1", "fe80::1", "fc00::1", "::ffff:127.0.0.1", "64:ff9b::a9fe:a9fe",
    "2002:7f00:1::", "192.0.2.10",
])
def test_non_public_addresses(ip: str) -> None:
    assert not is_public_address(ipaddress.ip_address(ip))


def test_public_addresses_and_allow_list_matching() -> None:
    assert is_public_address(ipaddress.ip_address("8.8.8.8"))
    assert is_public_address(ipaddress.ip_address("2606:4700:4700::1111"))
    assert host_allowed("CDN.example.", ["cdn.example"])
    assert host_allowed("a.b.cdn.example", ["*.cdn.example"]) and not host_allowed("cdn.example", ["*.cdn.example"])
    assert not host_allowed("evilcdn.example", ["*.cdn.example"])
    assert host_allowed("anything.example", ["*"]) and not host_allowed("x.example", [])


async def test_disabled_by_default_refuses_without_traffic() -> None:
    recorder = Recorder()
    settings = bare_settings()
    assert settings.remote_images_enabled is False
    async with recorder.client() as client:
        with pytest.raises(InvalidInput) as info:
            await fetch_remote_image("http://cdn.example/a.png", settings, client)
        with pytest.raises(InvalidInput):
            await image_bytes_from_url("https://cdn.example/a.png", settings, client)
    assert "disabled" in info.value.message and recorder.requests == []


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/a.png", "http://[::1]/a.png", "http://0.0.0.0/a.png",
    "http://169.254.169.254/latest/meta-data/", "http://10.0.0.7:8080/a.png", "http://[::ffff:127.0.0.1]/a.png",
    "http://[fe80::1]/a.png",
])
async def test_literal_internal_addresses_refused_before_connecting(url: str) -> None:
    host = httpx.URL(url).host
    recorder = Recorder()
    resolver = fake_resolver({})
    # Even with the address on the allow-list, the address check refuses it.
    async with recorder.client() as client:
        with pytest.raises(InvalidInput) as info:
            await fetch_remote_image(url, _settings(remote_image_hosts=[host]), client, resolver=resolver)
    assert info.value.code == "remote_image_refused" and "non-public" in info.value.message
    assert recorder.requests == [] and resolver.calls == []  # type: ignore[attr-defined]


@pytest.mark.parametrize("answers", [["127.0.0.1"], ["8.8.8.8", "10.0.0.1"], ["::1"], ["169.254.169.254"]])
async def test_names_resolving_to_internal_addresses_refused(answers: list[str]) -> None:
    recorder = Recorder()
    async with recorder.client() as client:
        with pytest.raises(InvalidInput) as info:
            await fetch_remote_image("https://cdn.example/a.png", _settings(), client,
                                     resolver=fake_resolver({"cdn.example": answers}))
    assert "non-public" in info.value.message and recorder.requests == []


@pytest.mark.parametrize("url, fragment", [
    ("ftp://cdn.example/a.png", "scheme"), ("file:///etc/passwd", "scheme"), ("gopher://cdn.example/", "scheme"),
    ("http://user:pw@cdn.example/a.png", "credentials"), ("http://other.example/a.png", "allow-list"),
    ("http:///a.png", "no host"), ("http://cdn.example:99999/a.png", "malformed"),
])
async def test_url_shape_refusals(url: str, fragment: str) -> None:
    recorder = Recorder()
    async with recorder.client() as client:
        with pytest.raises(InvalidInput) as info:
            await fetch_remote_image(url, _settings(), client, resolver=fake_resolver({"cdn.example": ["8.8.8.8"]}))
    assert fragment in info.value.message and recorder.requests == []


async def test_connection_is_pinned_to_the_checked_address() -> None:
    recorder = Recorder()
    async with recorder.client() as client:
        data = await fetch_remote_image("https://cdn.example/img/a.png?v=2", _settings(), client,
                                        resolver=fake_resolver({"cdn.example": ["8.8.8.8"]}))
    assert data == PNG
    (request,) = recorder.requests
    assert request.url.host == "8.8.8.8" and request.url.path == "/img/a.png" and request.url.query == b"v=2"
    assert request.headers["host"] == "cdn.example"
    assert request.extensions["sni_hostname"] == "cdn.example"  # TLS still verifies the name


async def test_data_urls_still_work_through_the_same_seam() -> None:
    url = data_url(PNG)
    assert await image_bytes_from_url(url, _settings(remote_images_enabled=False), None) == PNG


# --- against a real HTTP server on loopback -------------------------------------------------------

class LoopbackServer:
    """A raw asyncio HTTP/1.1 server on 127.0.0.1 with scripted paths; records every path it serves."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        self.port = 0
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode()
            self.hits.append(path)
            await self._respond(path, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _respond(self, path: str, writer: asyncio.StreamWriter) -> None:
        def head(status: str, headers: dict[str, str]) -> None:
            lines = [f"HTTP/1.1 {status}", "Connection: close", *(f"{k}: {v}" for k, v in headers.items())]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())

        redirects = {
            "/to-metadata": "http://metadata.cdn.example/latest/meta-data/",
            "/to-loopback-literal": f"http://127.0.0.2:{self.port}/secret",
            "/to-ipv6-loopback": f"http://[::1]:{self.port}/secret",
            "/to-other-host": "http://other.example/a.png",
            "/relative": "/img.png",
            "/loop": "/loop",
        }
        if path == "/img.png":
            head("200 OK", {"Content-Type": "image/png", "Content-Length": str(len(PNG))})
            writer.write(PNG)
        elif path in redirects:
            head("302 Found", {"Location": redirects[path], "Content-Length": "0"})
        elif path == "/huge-declared":
            head("200 OK", {"Content-Type": "image/png", "Content-Length": str(10**9)})
        elif path == "/huge-chunked":
            head("200 OK", {"Content-Type": "image/png", "Transfer-Encoding": "chunked"})
            for _ in range(64):  # 64 x 4 KiB = 256 KiB > the 64 KiB limit; the client hangs up early
                writer.write(b"1000\r\n" + b"\0" * 4096 + b"\r\n")
                await writer.drain()
            writer.write(b"0\r\n\r\n")
        elif path == "/slow":
            await asyncio.sleep(5)
        else:
            head("404 Not Found", {"Content-Length": "0"})
        await writer.drain()


class LoopbackOnlyTransport(httpx.AsyncBaseTransport):
    """The real transport, but any request to a non-loopback address is refused (and recorded)."""

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self.blocked: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not ipaddress.ip_address(request.url.host).is_loopback:
            self.blocked.append(str(request.url))
            raise httpx.ConnectError("test guard: non-loopback destination", request=request)
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


@pytest_asyncio.fixture
async def loopback_server() -> AsyncIterator[LoopbackServer]:
    server = LoopbackServer()
    await server.start()
    yield server
    await server.stop()


def _test_policy(ip: Address) -> bool:
    """Production policy plus exactly one exception: the test server standing in for a public CDN."""
    return ip == ipaddress.ip_address("127.0.0.1") or is_public_address(ip)


async def _fetch_from(server: LoopbackServer, path: str, **settings_kw: object) -> tuple[bytes, LoopbackOnlyTransport]:
    transport = LoopbackOnlyTransport()
    hosts = ["cdn.example", "*.cdn.example", "127.0.0.2", "::1"]
    resolver = fake_resolver({"cdn.example": ["127.0.0.1"], "metadata.cdn.example": ["169.254.169.254"]})
    async with httpx.AsyncClient(transport=transport) as client:
        try:
            data = await fetch_remote_image(
                f"http://cdn.example:{server.port}{path}", _settings(remote_image_hosts=hosts, **settings_kw),
                client, resolver=resolver, address_policy=_test_policy,
            )
        finally:
            assert transport.blocked == []  # nothing ever tried to leave loopback
    return data, transport


async def test_fetch_and_relative_redirect(loopback_server: LoopbackServer) -> None:
    assert (await _fetch_from(loopback_server, "/img.png"))[0] == PNG
    assert (await _fetch_from(loopback_server, "/relative"))[0] == PNG
    assert loopback_server.hits == ["/img.png", "/relative", "/img.png"]


@pytest.mark.parametrize("path, fragment", [
    ("/to-metadata", "non-public address (169.254.169.254)"),
    ("/to-loopback-literal", "non-public address (127.0.0.2)"),
    ("/to-ipv6-loopback", "non-public address (::1)"),
    ("/to-other-host", "not on the allow-list"),
    ("/loop", "more than 3 times"),
])
async def test_redirect_targets_are_rechecked(loopback_server: LoopbackServer, path: str, fragment: str) -> None:
    with pytest.raises(InvalidInput) as info:
        await _fetch_from(loopback_server, path)
    assert info.value.code == "remote_image_refused" and fragment in info.value.message
    assert "/secret" not in loopback_server.hits
    if path == "/loop":
        assert loopback_server.hits == ["/loop"] * 4  # the first request plus three redirects


@pytest.mark.parametrize("path", ["/huge-declared", "/huge-chunked"])
async def test_size_limit_cuts_off(loopback_server: LoopbackServer, path: str) -> None:
    with pytest.raises(PayloadTooLarge):
        await _fetch_from(loopback_server, path)


async def test_time_limit_and_http_errors(loopback_server: LoopbackServer) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(InvalidInput) as info:
        await _fetch_from(loopback_server, "/slow", remote_image_timeout_s=0.3)
    assert "longer than 0.3s" in info.value.message and loop.time() - started < 2
    with pytest.raises(InvalidInput) as info:
        await _fetch_from(loopback_server, "/missing")
    assert "HTTP 404" in info.value.message
