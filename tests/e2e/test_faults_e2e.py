"""Fault injection against real processes: a DEDICATED tiny vLLM (stopped, SIGSTOPped, killed mid-stream,
restarted), loopback servers that answer garbage or 500s, and a graceful uvicorn shutdown.

vlmrag runs under real uvicorn on loopback with small deadlines, so every fault must resolve into a
clear answer (503 + Retry-After, 502, or one SSE error event + ``[DONE]``) quickly and never a 500.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import httpx
import pytest

from server.app import create_app
from server.settings import Settings
from tests.support.fixtures_server import UvicornThread, running_client
from tests.support.settings import make_settings
from tests.support.vllm_server import VLLMServer, free_port

pytestmark = pytest.mark.e2e

DEADLINE_S = 4.0
SLACK_S = 3.0  # scheduling on a busy 2-core box, plus the ASGI/uvicorn hop
READY_WAIT_S = 240.0


def _fault_settings(data_dir: Path, clip_config: Path, vllm_url: str, **kw: Any) -> Settings:
    values: dict[str, Any] = {
        "vllm_url": [vllm_url], "vllm_model": "tiny-vlm", "vllm_deadline_s": DEADLINE_S,
        "vllm_read_timeout_s": 2.0, "vllm_connect_timeout_s": 1.0, "vllm_retry_attempts": 3,
        "vllm_unhealthy_for_s": 0.5, "rate_limit_burst": 100_000, "shutdown_grace_s": 10.0,
        # random weights sample an end-of-turn token every ~250 tokens: a stream that must still be
        # running when vLLM is killed asks vLLM (through the operator defaults) to ignore it
        "vllm_extra_body": {"ignore_eos": True},
    }
    values.update(kw)
    return make_settings(data_dir, clip_config, **values)


@dataclass
class FaultRig:
    vllm: VLLMServer
    url: str  # vlmrag under uvicorn
    settings: Settings
    tripwire: TripwireTransport  # under vlmrag's vLLM client: fires on the first chunk of an armed stream


@pytest.fixture(scope="module")
def fault_vllm(tiny_vlm_dir: Path) -> Iterator[VLLMServer]:
    """A vLLM of our own: these tests stop, pause, kill and restart it."""
    from tests.support.fixtures_vllm import vllm_python

    server = VLLMServer(tiny_vlm_dir, served_model_name="tiny-vlm", venv_python=vllm_python(),
                        extra_args=("--max-model-len", "4096"))
    try:
        server.start()
    except Exception as exc:  # noqa: BLE001 - the log tail is in the message
        pytest.fail(f"dedicated vLLM did not start: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.resume()  # a paused group would ignore the stop
        server.stop()


class TripwireTransport(httpx.AsyncBaseTransport):
    """The real transport to vLLM; once ``arm``ed, the next streamed chat calls its trigger as vlmrag
    receives the first chunk from vLLM, so a kill lands at a known point of the stream (a kill timed
    from the test's client lands wherever the relay happens to be: it once found vLLM done)."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=64))
        self.trigger: Any = None

    def arm(self, trigger: Any) -> None:
        self.trigger = trigger

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        trigger, self.trigger = self.trigger, None
        if trigger is None:
            return response
        upstream = response.stream
        assert isinstance(upstream, httpx.AsyncByteStream)

        class Tripped(httpx.AsyncByteStream):
            async def __aiter__(self):  # type: ignore[no-untyped-def]
                fired = False
                async for chunk in upstream:
                    if not fired:
                        fired = True
                        trigger()
                    yield chunk

            async def aclose(self) -> None:
                await upstream.aclose()

        return httpx.Response(response.status_code, headers=response.headers, stream=Tripped(),
                              extensions=response.extensions, request=request)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.fixture(scope="module")
def rig(fault_vllm: VLLMServer, tmp_path_factory: pytest.TempPathFactory, tiny_clip_config: Path) -> Iterator[FaultRig]:
    settings = _fault_settings(tmp_path_factory.mktemp("faults"), tiny_clip_config, fault_vllm.url)
    tripwire = TripwireTransport()
    server = UvicornThread(create_app(settings, vllm_transport=tripwire), free_port())
    server.start()
    try:
        yield FaultRig(fault_vllm, f"http://127.0.0.1:{server.server.config.port}", settings, tripwire)
    finally:
        server.stop()


CHAT = {"model": "vlmrag", "messages": [{"role": "user", "content": "How long is the warranty?"}],
        "max_tokens": 8, "temperature": 0}


def _chat(url: str, stream: bool = False, **extra: Any) -> tuple[httpx.Response, float, list[str]]:
    """POST a chat; returns the response, the seconds it took (to the last byte) and SSE data lines."""
    started = time.monotonic()
    with httpx.Client(base_url=url, timeout=60) as client, \
            client.stream("POST", "/v1/chat/completions", json={**CHAT, **extra, "stream": stream}) as response:
        body = response.read()
    events = [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")] if stream else []
    return response, time.monotonic() - started, events


def _assert_retry_later(response: httpx.Response, elapsed: float) -> None:
    assert response.status_code == 503, response.text
    assert int(response.headers["Retry-After"]) >= 1
    assert response.json()["error"]["code"] in ("model_unavailable", "upstream_unavailable")
    assert elapsed < DEADLINE_S + SLACK_S, f"took {elapsed:.1f}s, deadline {DEADLINE_S}s"


def _wait_ready(url: str, timeout: float = READY_WAIT_S) -> float:
    """Poll /readyz until 200; returns the seconds waited."""
    started = time.monotonic()
    with httpx.Client(base_url=url, timeout=5) as client:
        while time.monotonic() - started < timeout:
            try:
                if client.get("/readyz").status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
    raise AssertionError(f"/readyz not green within {timeout:.0f}s")


def _readyz(url: str) -> int:
    return httpx.get(f"{url}/readyz", timeout=10).status_code


def test_baseline_green(rig: FaultRig) -> None:
    _wait_ready(rig.url)
    response, _, _ = _chat(rig.url)
    assert response.status_code == 200, response.text


def test_vllm_stopped_then_restarted_without_restarting_vlmrag(rig: FaultRig) -> None:
    rig.vllm.stop()
    try:
        plain, elapsed, _ = _chat(rig.url)
        _assert_retry_later(plain, elapsed)
        streamed, elapsed, _ = _chat(rig.url, stream=True)  # fails before the stream starts: a real 503
        _assert_retry_later(streamed, elapsed)
        assert _readyz(rig.url) == 503
    finally:
        rig.vllm.start()
    _wait_ready(rig.url)
    response, _, _ = _chat(rig.url)
    assert response.status_code == 200, response.text


def test_vllm_paused_is_bounded_by_the_deadline(rig: FaultRig) -> None:
    rig.vllm.pause()  # SIGSTOP: connections are accepted, nothing ever answers
    try:
        plain, elapsed, _ = _chat(rig.url)
        _assert_retry_later(plain, elapsed)
        assert _readyz(rig.url) == 503
    finally:
        rig.vllm.resume()
    _wait_ready(rig.url, timeout=60)
    response, _, _ = _chat(rig.url)
    assert response.status_code == 200, response.text


def test_vllm_killed_mid_stream_ends_with_one_error_event_and_done(rig: FaultRig) -> None:
    _wait_ready(rig.url)
    # top logprobs make every token cost vLLM more (20 detokenised alternatives): the stream must still be
    # running when the kill lands, and the tiny model alone can stream 2000 tokens in well under a second
    # ignore_eos: random weights at temperature 1 may sample EOS early, which would end the stream first.
    # The kill lands when vlmrag receives vLLM's first chunk (the tripwire under its client): killed from
    # the test's client instead, it landed wherever the relay was, and on a busy box vLLM was done by then.
    body = {**CHAT, "max_tokens": 2000, "stream": True, "temperature": 1.0, "seed": 7,
            "logprobs": True, "top_logprobs": 20, "ignore_eos": True}
    events: list[str] = []
    killed: list[float] = []

    def kill_now() -> None:  # on vlmrag's event loop: SIGKILL only (reaped below), never a wait
        rig.vllm.kill_now()
        killed.append(time.monotonic())

    rig.tripwire.arm(kill_now)
    try:
        with httpx.Client(base_url=rig.url, timeout=60) as client:
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
        assert killed, "the tripwire never fired: vlmrag streamed nothing from vLLM"
        ended_after = time.monotonic() - killed[0]
    finally:
        rig.tripwire.arm(None)
        rig.vllm.kill()  # reaps the killed group
        rig.vllm.start()
    assert events[-1] == "[DONE]"
    payloads = [json.loads(e) for e in events[:-1]]
    errors = [p for p in payloads if "error" in p]
    finished = [p for p in payloads if any(c.get("finish_reason") for c in p.get("choices", []))]
    assert not finished, "the model finished before it was killed; the test did not test anything"
    assert len(errors) == 1 and payloads[-1] is errors[0], payloads[-3:]
    assert errors[0]["error"]["type"] in ("service_unavailable", "upstream_error")
    assert ended_after < DEADLINE_S + SLACK_S
    _wait_ready(rig.url)


# --- upstreams that answer nonsense ------------------------------------------------------------------

class BadUpstream:
    """A raw asyncio HTTP server on 127.0.0.1 answering every request the same broken way."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.requests = 0
        self._server: asyncio.base_events.Server | None = None
        self.url = ""

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            if length:
                await reader.readexactly(length)
            self.requests += 1
            writer.write(self._answer())
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def _answer(self) -> bytes:
        def http(status: str, body: bytes, ctype: bytes = b"application/json") -> bytes:
            return (f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n".encode()
                    + b"Content-Type: " + ctype + b"\r\n\r\n" + body)

        if self.mode == "not_http":
            return b"\x00\xff\xfe garbage that is not HTTP at all \r\n\r\n"
        if self.mode == "bad_json":
            return http("200 OK", b'{"choices": [{"message": ')
        if self.mode == "wrong_shape":
            return http("200 OK", b'{"data": [{"id": "tiny-vlm"}], "hello": "world"}')
        if self.mode == "html":
            return http("200 OK", b"<html>proxy login</html>", b"text/html")
        if self.mode == "error_500":
            return http("500 Internal Server Error", b'{"error": {"message": "CUDA out of memory"}}')
        raise AssertionError(self.mode)


@pytest.mark.parametrize("mode", ["not_http", "bad_json", "wrong_shape", "html", "error_500"])
async def test_bad_upstream_gives_502_or_503_never_500(mode: str, tmp_path: Path, tiny_clip_config: Path,
                                                       embedder: Any) -> None:
    from server.wiring import build_knowledge_base

    async with BadUpstream(mode) as upstream:
        settings = _fault_settings(tmp_path / "data", tiny_clip_config, upstream.url)
        kb = await build_knowledge_base(settings, embedder=embedder)
        try:
            async with running_client(create_app(settings, knowledge_base=kb)) as client:
                for stream in (False, True):
                    started = time.monotonic()
                    response = await client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
                    elapsed = time.monotonic() - started
                    assert elapsed < DEADLINE_S + SLACK_S
                    if response.status_code == 200:  # a stream that failed after it began
                        assert stream
                        events = [ln[6:] for ln in response.text.splitlines() if ln.startswith("data: ")]
                        assert events[-1] == "[DONE]" and "error" in json.loads(events[-2]), events[-3:]
                        continue
                    assert response.status_code in (502, 503), (mode, stream, response.text)
                    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
                    if response.status_code == 503:
                        assert int(response.headers["Retry-After"]) >= 1
                # "wrong_shape" happens to be a valid /v1/models answer listing the model: ready is right
                assert (await client.get("/readyz")).status_code == (200 if mode == "wrong_shape" else 503)
        finally:
            await kb.close()
    assert upstream.requests >= 1


# --- graceful shutdown -----------------------------------------------------------------------------

def test_graceful_shutdown_finishes_in_flight_and_refuses_new(fault_vllm: VLLMServer, tmp_path: Path,
                                                              tiny_clip_config: Path) -> None:
    settings = _fault_settings(tmp_path / "data", tiny_clip_config, fault_vllm.url)
    port = free_port()
    server = UvicornThread(create_app(settings), port)
    server.start()
    url = f"http://127.0.0.1:{port}"
    _wait_ready(url)
    events: list[str] = []
    signalled = threading.Event()
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            with client.stream("POST", "/v1/chat/completions",
                               json={**CHAT, "max_tokens": 64, "stream": True}) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                    if len(events) == 1 and not signalled.is_set():
                        server.server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler does
                        signalled.set()
                        time.sleep(0.5)  # let it close the listening socket
                        with pytest.raises(httpx.ConnectError):
                            httpx.get(f"{url}/healthz", timeout=2)
    finally:
        server.stop()
    assert signalled.is_set()
    assert events[-1] == "[DONE]"
    assert not any("error" in json.loads(e) for e in events[:-1])  # the in-flight answer completed
    assert not server.thread.is_alive()
