"""Token-bucket math (injected clock), 429 + Retry-After over HTTP, and the bounded model-call gate."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import FastAPI

from retriever.errors import Overloaded, RateLimited
from server.auth import ChatAuth, Principal, build_access_control, get_access_control
from server.errors import install_error_handlers
from server.gate import ModelCallGate
from server.ratelimit import RateLimiter
from tests.support.settings import bare_settings


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_burst_then_refills_at_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=2.0, burst=3, clock=clock)
    assert [limiter.try_acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.try_acquire("a") == pytest.approx(0.5)  # one token at 2/s
    clock.now += 0.25
    assert limiter.try_acquire("a") == pytest.approx(0.25)  # refused requests cost nothing
    clock.now += 0.25
    assert limiter.try_acquire("a") == 0.0
    assert limiter.try_acquire("b") == 0.0  # buckets are per key
    clock.now += 100
    assert [limiter.try_acquire("a") for _ in range(4)][-1] > 0  # refill caps at the burst


def test_check_raises_with_whole_second_retry_after() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=0.25, burst=1, clock=clock)
    limiter.check("k")
    with pytest.raises(RateLimited) as info:
        limiter.check("k")
    assert info.value.retry_after == 4.0 and info.value.status_code == 429
    clock.now += 1.5
    with pytest.raises(RateLimited) as info:
        limiter.check("k")
    assert info.value.retry_after == 3.0  # ceil(2.5)


def test_idle_buckets_are_pruned_first() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=1.0, burst=2, clock=clock, max_keys=3)
    for key in ("old1", "old2"):
        limiter.try_acquire(key)
    clock.now += 10  # old buckets are full again: forgetting them changes nothing
    for key in ("new1", "new2", "new3"):
        limiter.try_acquire(key)
        limiter.try_acquire(key)
    assert len(limiter) == 3
    assert limiter.try_acquire("new1") > 0  # the busy buckets were kept


async def test_http_429_with_retry_after_per_key() -> None:
    settings = bare_settings(api_keys="chat:key-one-0123456789abc,chat:key-two-0123456789abc",
                             rate_limit_rps=0.5, rate_limit_burst=2)
    app = FastAPI()
    access = build_access_control(settings)
    app.dependency_overrides[get_access_control] = lambda: access
    install_error_handlers(app)

    @app.get("/x")
    async def route(principal: Principal = ChatAuth) -> dict[str, str]:
        return {"who": principal.key_id}

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        one = {"Authorization": "Bearer key-one-0123456789abc"}
        statuses = [(await client.get("/x", headers=one)).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
        refused = await client.get("/x", headers=one)
        assert refused.status_code == 429
        assert 1 <= int(refused.headers["Retry-After"]) <= 2
        assert refused.json()["error"]["type"] == "rate_limit_error"
        # another key has its own bucket; a wrong key is refused before it can drain anyone's
        assert (await client.get("/x", headers={"X-API-Key": "key-two-0123456789abc"})).status_code == 200
        assert (await client.get("/x", headers={"X-API-Key": "nope"})).status_code == 401


async def test_gate_bounds_concurrency_and_queue() -> None:
    gate = ModelCallGate(max_concurrent=2, max_queued=1, max_wait_s=5)
    release = asyncio.Event()
    peak = 0

    async def call() -> str:
        nonlocal peak
        async with gate:
            peak = max(peak, gate.active)
            await release.wait()
            return "ok"

    running = [asyncio.create_task(call()) for _ in range(3)]  # 2 run, 1 queues
    await asyncio.sleep(0.05)
    assert (gate.active, gate.waiting) == (2, 1)
    with pytest.raises(Overloaded) as info:
        await gate.acquire()  # queue full: refused at once, not queued
    assert info.value.status_code == 503 and info.value.retry_after is not None and info.value.retry_after >= 1
    release.set()
    assert await asyncio.gather(*running) == ["ok"] * 3
    assert peak == 2 and (gate.active, gate.waiting, gate.refused) == (0, 0, 1)


async def test_gate_queue_wait_is_bounded_and_slots_release_on_error() -> None:
    gate = ModelCallGate(max_concurrent=1, max_queued=5, max_wait_s=0.1)
    slot = await gate.acquire()
    with pytest.raises(Overloaded):
        await gate.acquire()  # waited 0.1 s, then refused: latency stays bounded
    assert gate.waiting == 0
    slot.release()
    slot.release()  # idempotent: the count cannot go negative
    with pytest.raises(RuntimeError):
        async with gate:
            raise RuntimeError("model call failed")
    assert gate.active == 0
    async with gate:
        assert gate.active == 1


async def test_overload_over_http_is_503_with_retry_after() -> None:
    gate = ModelCallGate(max_concurrent=1, max_queued=0)
    app = FastAPI()
    install_error_handlers(app)
    release = asyncio.Event()

    @app.get("/model")
    async def model() -> dict[str, bool]:
        async with gate:
            await release.wait()
        return {"ok": True}

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        first = asyncio.create_task(client.get("/model"))
        await asyncio.sleep(0.05)
        refused = await client.get("/model")
        release.set()
        assert (await first).status_code == 200
    assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"]["code"] == "overloaded"


# --- the real app ---------------------------------------------------------------------------------

CHAT = {"model": "vlmrag", "messages": [{"role": "user", "content": "how do I reset it?"}]}


async def test_real_app_rate_limits_per_client(make_client) -> None:
    async with make_client(rate_limit_rps=0.2, rate_limit_burst=2) as client:
        statuses = [(await client.get("/v1/models")).status_code for _ in range(3)]
        refused = await client.post("/v1/chat/completions", json=CHAT)
        health = await client.get("/healthz")
    assert statuses == [200, 200, 429]
    assert refused.status_code == 429 and 1 <= int(refused.headers["Retry-After"]) <= 5
    assert refused.json()["error"]["code"] == "rate_limited"
    assert health.status_code == 200  # probes are not rate limited


async def test_real_app_chat_goes_through_the_gate(settings, knowledge_base, fake_vllm) -> None:
    """With the only model slot held and no queue, chat (plain and streamed) gets 503 + Retry-After at once."""
    from server.app import create_app
    from tests.support.fixtures_server import running_client

    changed = settings.model_copy(update={"max_concurrent_model_calls": 1, "max_queued_model_calls": 0})
    app = create_app(changed, knowledge_base=knowledge_base, vllm_transport=httpx.MockTransport(fake_vllm))
    async with running_client(app) as client:
        gate: ModelCallGate = app.state.vlmrag.gate
        slot = await gate.acquire()
        plain = await client.post("/v1/chat/completions", json=CHAT)
        streamed = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        asked = await client.post("/v1/ask", data={"question": "hi"})
        slot.release()
        ok = await client.post("/v1/chat/completions", json=CHAT)
    for refused in (plain, streamed, asked):
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "overloaded" and int(refused.headers["Retry-After"]) >= 1
    assert ok.status_code == 200 and gate.active == 0
    assert len(fake_vllm.answer_bodies) == 1  # refused calls never reached the model


async def test_image_and_thumbnail_gets_have_their_own_larger_bucket(make_client, knowledge_base) -> None:
    """The KB page's grid of 24 thumbnails fits the media bucket and leaves the API bucket untouched."""
    from tests.support.fixtures_server import ingest_samples

    snippet_id = (await ingest_samples(knowledge_base))[0]  # an image snippet
    async with make_client(rate_limit_rps=0.2, rate_limit_burst=2,
                           rate_limit_media_rps=0.2, rate_limit_media_burst=26) as client:
        media = [(await client.get(f"/v1/snippets/{snippet_id}/thumbnail")).status_code for _ in range(24)]
        media += [(await client.get(f"/v1/snippets/{snippet_id}/image")).status_code for _ in range(2)]
        media_refused = await client.get(f"/v1/snippets/{snippet_id}/thumbnail")
        api = [(await client.get("/v1/models")).status_code for _ in range(3)]
    assert media == [200] * 26
    assert media_refused.status_code == 429 and int(media_refused.headers["Retry-After"]) >= 1
    assert api == [200, 200, 429]  # the 26 image reads cost the API bucket nothing


def test_media_bucket_defaults_and_unknown_bucket() -> None:
    from server.auth import require_scope

    settings = bare_settings()
    assert (settings.rate_limit_media_rps, settings.rate_limit_media_burst) == (100.0, 200)
    assert settings.rate_limit_media_burst > settings.rate_limit_burst
    with pytest.raises(ValueError, match="bucket"):
        require_scope("chat", bucket="thumbnails")


async def test_gate_from_settings_bounds_the_queue_wait_by_max_queue_wait_s() -> None:
    """A queued call waits max_queue_wait_s for a slot, not the whole vllm_deadline_s."""
    settings = bare_settings(max_queue_wait_s=0.1, vllm_deadline_s=30.0,
                             max_concurrent_model_calls=1, max_queued_model_calls=4)
    gate = ModelCallGate.from_settings(settings)
    slot = await gate.acquire()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(Overloaded) as info:
        async with asyncio.timeout(5):  # before the setting existed this waited the 30 s deadline
            await gate.acquire()
    waited = loop.time() - started
    assert 0.08 <= waited < 2, waited
    assert info.value.status_code == 503 and info.value.retry_after is not None and info.value.retry_after >= 1
    assert "0.1s" in info.value.message and (gate.waiting, gate.refused) == (0, 1)
    slot.release()
    assert bare_settings().max_queue_wait_s == 10.0
