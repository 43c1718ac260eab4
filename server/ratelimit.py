"""Per-key rate limit (token bucket) and the global concurrency gate in front of model calls.

* ``RateLimiter`` — one token bucket per caller (API key hash prefix, or client IP with auth off):
  ``settings.rate_limit_rps`` tokens/s, at most ``settings.rate_limit_burst`` saved. An empty bucket
  raises ``RateLimited`` (429) whose ``retry_after`` is the time until the next token. Routes get it
  through ``server.auth.require_scope`` (``ChatAuth``/``AdminAuth``), which calls
  ``enforce_rate_limit`` after authenticating.
* Buckets (``BUCKETS``): ``"default"`` for the API, ``"media"`` (``rate_limit_media_*``, much larger)
  for snippet image/thumbnail GETs, which are cheap blob reads a page fetches by the dozen. Each
  bucket is its own limiter, so images never drain the API's tokens or the other way round.
* ``enforce_auth_failure_limit`` — failed authentications (401) are charged to the client IP
  (``rate_limit_auth_failures_*``); once that bucket is empty further failures get 429 instead of
  401. Successful requests are never charged, so a shared (NAT) address with one bad client still
  works for everyone holding a valid key.
* ``ModelCallGate`` — at most ``settings.max_concurrent_model_calls`` answering-model calls run at
  once and at most ``settings.max_queued_model_calls`` wait (each at most ``settings.max_queue_wait_s``,
  never past ``vllm_deadline_s``); beyond
  that ``Overloaded`` (503 + Retry-After) is raised at once, so overload shows up as fast refusals
  instead of ever-growing latency. Use ``async with gate:`` around a non-streamed call, or
  ``slot = await gate.acquire()`` *before* a streamed response starts and ``slot.release()`` when the
  stream ends (so a refusal is still a real 503, not an error inside a 200 stream).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

from fastapi import Request

from retriever.errors import Overloaded, RateLimited
from server.settings import Settings

Clock = Callable[[], float]
_LIMITERS_ATTR = "rate_limiters"  # app.state attribute: bucket name -> RateLimiter
BUCKETS = ("default", "media")
AUTH_FAILURES = "auth_failures"  # the per-IP bucket of failed authentications


class RateLimiter:
    """Token buckets keyed by caller; memory is bounded by dropping idle (refilled) buckets first."""

    def __init__(self, rate: float, burst: int, *, clock: Clock = time.monotonic, max_keys: int = 100_000) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = float(rate)
        self.burst = float(burst)
        self._clock = clock
        self._max_keys = max_keys
        # key -> (tokens, last update); ordered by last use so the stalest are pruned first.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    @classmethod
    def from_settings(
        cls, settings: Settings, *, bucket: str = "default", clock: Clock = time.monotonic,
    ) -> RateLimiter:
        """The limiter of ``bucket`` ("default", "media" or "auth_failures") as configured in settings."""
        if bucket == "default":
            rate, burst = settings.rate_limit_rps, settings.rate_limit_burst
        elif bucket == "media":
            rate, burst = settings.rate_limit_media_rps, settings.rate_limit_media_burst
        elif bucket == AUTH_FAILURES:
            rate, burst = settings.rate_limit_auth_failures_per_min / 60.0, settings.rate_limit_auth_failures_burst
        else:
            raise ValueError(f"unknown rate-limit bucket {bucket!r} (known: {', '.join(BUCKETS)}, {AUTH_FAILURES})")
        return cls(rate, burst, clock=clock)

    def _tokens(self, key: str, now: float) -> float:
        tokens, last = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + max(0.0, now - last) * self.rate)

    def try_acquire(self, key: str, cost: float = 1.0) -> float:
        """Take ``cost`` tokens; returns 0.0 if allowed, else the seconds until enough tokens exist."""
        now = self._clock()
        tokens = self._tokens(key, now)
        if tokens >= cost:
            self._buckets[key] = (tokens - cost, now)
            self._buckets.move_to_end(key)
            self._prune(now)
            return 0.0
        # A refused request costs nothing: the bucket only records the refill so far.
        self._buckets[key] = (tokens, now)
        self._buckets.move_to_end(key)
        return (cost - tokens) / self.rate

    def check(self, key: str) -> None:
        """Take one token or raise RateLimited with ``retry_after`` (whole seconds, at least 1)."""
        wait = self.try_acquire(key)
        if wait > 0:
            raise RateLimited(
                f"rate limit exceeded: {self.rate:g} requests/s (burst {int(self.burst)}); "
                f"retry in {wait:.1f}s",
                retry_after=_whole_seconds(wait),
            )

    def _prune(self, now: float) -> None:
        if len(self._buckets) <= self._max_keys:
            return
        full_after = self.burst / self.rate  # an idle bucket is full again after this long
        for key in list(self._buckets):
            if len(self._buckets) <= self._max_keys:
                break
            _, last = self._buckets[key]
            if now - last >= full_after:
                del self._buckets[key]
        while len(self._buckets) > self._max_keys:  # still over: drop the least recently used
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)


def _whole_seconds(wait: float) -> float:
    """Retry-After in whole seconds, at least 1 (HTTP sends an integer)."""
    return float(max(1, math.ceil(wait)))


def app_limiter(request: Request, bucket: str) -> RateLimiter:
    """The app's limiter for ``bucket``, built from settings on first use and kept on ``app.state``."""
    state: Any = request.app.state
    limiters: dict[str, RateLimiter] | None = getattr(state, _LIMITERS_ATTR, None)
    if limiters is None:
        limiters = {}
        setattr(state, _LIMITERS_ATTR, limiters)
    limiter = limiters.get(bucket)
    if limiter is None:
        limiter = limiters[bucket] = RateLimiter.from_settings(state.settings, bucket=bucket)
    return limiter


def enforce_rate_limit(request: Request, key: str, bucket: str = "default") -> None:
    """Charge one request to ``key`` in ``bucket``; raises RateLimited (429) when it is empty."""
    app_limiter(request, bucket).check(key)


def enforce_auth_failure_limit(request: Request, address: str) -> None:
    """Charge one failed authentication to ``address``; raises RateLimited (429) once over the budget."""
    limiter = app_limiter(request, AUTH_FAILURES)
    wait = limiter.try_acquire(address)
    if wait > 0:
        raise RateLimited(
            f"too many failed authentication attempts from this address (at most {int(limiter.burst)}, "
            f"then {limiter.rate * 60:g} per minute); retry in {wait:.1f}s with a valid API key",
            retry_after=_whole_seconds(wait), code="too_many_auth_failures",
        )


class GateSlot:
    """One held place in a ModelCallGate; ``release()`` is idempotent."""

    def __init__(self, gate: ModelCallGate, started: float) -> None:
        self._gate = gate
        self._started = started
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._gate._release(self._gate._clock() - self._started)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class ModelCallGate:
    """Bounded concurrency with a bounded queue in front of the answering model."""

    def __init__(
        self, max_concurrent: int, max_queued: int, *, max_wait_s: float = 30.0, clock: Clock = time.monotonic,
    ) -> None:
        if max_concurrent < 1 or max_queued < 0:
            raise ValueError("max_concurrent must be >= 1 and max_queued >= 0")
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued
        self.max_wait_s = max_wait_s
        self._clock = clock
        self._sem = asyncio.Semaphore(max_concurrent)
        self.active = 0
        self.waiting = 0
        self.refused = 0
        self._avg_call_s = 1.0  # EWMA of held time; only used to estimate Retry-After
        self._held: list[GateSlot] = []  # per-task slot stack for ``async with gate:``

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelCallGate:
        # A slot won after the call's whole deadline is useless; waiting long is worse than a fast 503.
        return cls(
            settings.max_concurrent_model_calls, settings.max_queued_model_calls,
            max_wait_s=min(settings.max_queue_wait_s, settings.vllm_deadline_s),
        )

    def retry_after(self) -> float:
        """Seconds a refused caller should wait: roughly how long the queue ahead takes to drain."""
        rounds = (self.waiting + self.active) / self.max_concurrent
        return float(min(60, max(1, math.ceil(self._avg_call_s * max(rounds, 1.0)))))

    def _refuse(self, why: str) -> Overloaded:
        self.refused += 1
        return Overloaded(
            f"server overloaded ({why}: {self.active} model calls running, {self.waiting} queued); retry later",
            retry_after=self.retry_after(),
        )

    async def acquire(self) -> GateSlot:
        """Wait for a slot (bounded in queue length and time) or raise Overloaded (503)."""
        if self._sem.locked():
            if self.waiting >= self.max_queued:
                raise self._refuse("queue full")
            self.waiting += 1
            try:
                await asyncio.wait_for(self._sem.acquire(), timeout=self.max_wait_s)
            except TimeoutError:
                raise self._refuse(f"no slot within {self.max_wait_s:g}s") from None
            finally:
                self.waiting -= 1
        else:
            await self._sem.acquire()
        self.active += 1
        return GateSlot(self, self._clock())

    def _release(self, held_s: float) -> None:
        self.active -= 1
        self._avg_call_s = 0.8 * self._avg_call_s + 0.2 * max(held_s, 0.0)
        self._sem.release()

    async def __aenter__(self) -> GateSlot:
        slot = await self.acquire()
        self._held.append(slot)
        return slot

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None,
    ) -> None:
        # Slots are interchangeable (only counts and timing matter), so any held one may be released.
        self._held.pop().release()
