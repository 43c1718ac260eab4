"""The global concurrency gate in front of answering-model calls.

``ModelCallGate`` lets at most ``settings.max_concurrent_model_calls`` answering-model calls run at
once and at most ``settings.max_queued_model_calls`` wait (each at most ``settings.max_queue_wait_s``,
never past ``vllm_deadline_s``); beyond that ``Overloaded`` (503 + Retry-After) is raised at once, so
overload shows up as fast refusals instead of ever-growing latency. Use ``async with gate:`` around a
non-streamed call, or ``slot = await gate.acquire()`` *before* a streamed response starts and
``slot.release()`` when the stream ends (so a refusal is still a real 503, not an error inside a 200
stream). The lifespan builds one per app (``AppState.gate``); ``ChatService`` holds the same one.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from types import TracebackType
from typing import Self

from retriever.errors import Overloaded
from server.settings import Settings

Clock = Callable[[], float]


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
