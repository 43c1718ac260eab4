"""Per-key rate limit (token bucket) and the global concurrency gate in front of model calls.

* ``RateLimiter`` — one token bucket per caller (API key hash prefix, or client IP with auth off):
  ``settings.rate_limit_rps`` tokens/s, at most ``settings.rate_limit_burst`` saved. An empty bucket
  raises ``RateLimited`` (429) whose ``retry_after`` is the time until the next token. Routes get it
  through ``server.auth.require_scope`` (``ChatAuth``/``AdminAuth``), which calls
  ``enforce_rate_limit`` after authenticating.
* ``ModelCallGate`` — at most ``settings.max_concurrent_model_calls`` answering-model calls run at
  once and at most ``settings.max_queued_model_calls`` wait (each at most ``max_wait_s``); beyond
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
_LIMITER_ATTR = "rate_limiter"


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
    def from_settings(cls, settings: Settings, *, clock: Clock = time.monotonic) -> RateLimiter:
        return cls(settings.rate_limit_rps, settings.rate_limit_burst, clock=clock)

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
                retry_after=float(max(1, math.ceil(wait))),
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


def enforce_rate_limit(request: Request, key: str) -> None:
    """Charge one request to ``key`` on the app's limiter (built lazily from settings if absent)."""
    state: Any = request.app.state
    limiter = getattr(state, _LIMITER_ATTR, None)
    if limiter is None:
        limiter = RateLimiter.from_settings(state.settings)
        setattr(state, _LIMITER_ATTR, limiter)
    limiter.check(key)


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
        return cls(
            settings.max_concurrent_model_calls, settings.max_queued_model_calls,
            max_wait_s=settings.vllm_deadline_s,
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
