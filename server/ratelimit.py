"""Per-caller rate limits (token buckets); pure, no FastAPI: ``server/auth.py`` charges them.

* ``RateLimiter`` — one token bucket per caller (API key hash prefix, or client IP with auth off):
  ``settings.rate_limit_rps`` tokens/s, at most ``settings.rate_limit_burst`` saved. An empty bucket
  raises ``RateLimited`` (429) whose ``retry_after`` is the time until the next token.
* ``RateLimiters`` — the app's limiter of every bucket, built once by the lifespan (kept in
  ``AppState.access``). Routes are charged through ``server.auth.require_scope``
  (``ChatAuth``/``AdminAuth``), after authenticating.
* Buckets (``BUCKETS``): ``"default"`` for the API, ``"media"`` (``rate_limit_media_*``, much larger)
  for snippet image/thumbnail GETs, which are cheap blob reads a page fetches by the dozen. Each
  bucket is its own limiter, so images never drain the API's tokens or the other way round.
* ``RateLimiters.charge_auth_failure`` — failed authentications (401) are charged to the client IP
  (``rate_limit_auth_failures_*``); once that bucket is empty further failures get 429 instead of
  401. Successful requests are never charged, so a shared (NAT) address with one bad client still
  works for everyone holding a valid key.

The model-call concurrency gate (503 when the queue is full) is ``server/gate.py``.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

from retriever.errors import RateLimited
from server.settings import Settings

Clock = Callable[[], float]
BUCKETS = ("default", "media", "kb")  # "kb": per knowledge base, all keys together (rate_limit_kb_*)
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
        elif bucket == "kb":
            rate, burst = settings.rate_limit_kb_rps, settings.rate_limit_kb_burst
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


class RateLimiters:
    """The limiter of every bucket (``BUCKETS`` and ``AUTH_FAILURES``) of one app."""

    def __init__(self, limiters: dict[str, RateLimiter]) -> None:
        self._limiters = dict(limiters)

    @classmethod
    def from_settings(cls, settings: Settings, *, clock: Clock = time.monotonic) -> RateLimiters:
        return cls({bucket: RateLimiter.from_settings(settings, bucket=bucket, clock=clock)
                    for bucket in (*BUCKETS, AUTH_FAILURES)})

    def __getitem__(self, bucket: str) -> RateLimiter:
        return self._limiters[bucket]

    def charge(self, key: str, bucket: str = "default") -> None:
        """Charge one request to ``key`` in ``bucket``; raises RateLimited (429) when it is empty."""
        self._limiters[bucket].check(key)

    def charge_auth_failure(self, address: str) -> None:
        """Charge one failed authentication to ``address``; raises RateLimited (429) once over the budget."""
        limiter = self._limiters[AUTH_FAILURES]
        wait = limiter.try_acquire(address)
        if wait > 0:
            raise RateLimited(
                f"too many failed authentication attempts from this address (at most {int(limiter.burst)}, "
                f"then {limiter.rate * 60:g} per minute); retry in {wait:.1f}s with a valid API key",
                retry_after=_whole_seconds(wait), code="too_many_auth_failures",
            )
