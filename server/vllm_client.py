"""Async client for vLLM's OpenAI-compatible API: replicas, retries before the first token, streaming.

* Requests spread over replicas by least in-flight; a replica that fails (connect error, timeout,
  5xx) is skipped for ``unhealthy_for_s`` unless nothing else is left.
* tenacity retries transient failures (connect errors, timeouts, 429/500/502/503/504) with
  exponential backoff and jitter, bounded by attempts and the total deadline. Nothing has been
  relayed to our caller before :meth:`VLLMClient.open_stream` returns, so retrying there is safe;
  once the stream is handed over it is never retried.
* Out of retries → ``ModelUnavailable`` (503 + Retry-After); nonsense → ``UpstreamError`` (502);
  vLLM refusing our request (400) → ``InvalidInput``.

The transport is injectable (``httpx.MockTransport`` in tests), exactly where the network plugs in.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_before_delay,
    wait_random_exponential,
)

from retriever.errors import InvalidInput, ModelUnavailable, UpstreamError, VlmragError
from server.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")
TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
_ERROR_TEXT_LIMIT = 500


class _Transient(Exception):
    """A failure worth another attempt (maybe on another replica)."""

    def __init__(self, message: str, *, mark_unhealthy: bool = True, retry_after: float | None = None):
        super().__init__(message)
        self.mark_unhealthy = mark_unhealthy
        self.retry_after = retry_after


@dataclass(slots=True)
class Replica:
    """One vLLM base URL and what we know about it."""

    url: str  # root, without /v1
    in_flight: int = 0
    unhealthy_until: float = 0.0
    last_pick: int = 0
    failures: int = 0


class ReplicaPool:
    """Least-in-flight choice among healthy replicas; failing ones sit out for a while."""

    def __init__(self, urls: list[str], unhealthy_for_s: float, clock: Callable[[], float]) -> None:
        if not urls:
            raise ValueError("at least one vLLM URL is needed")
        self.replicas = [Replica(_root_url(u)) for u in urls]
        self.unhealthy_for_s = unhealthy_for_s
        self._clock = clock
        self._picks = itertools.count(1)

    def pick(self, avoid: str | None = None) -> Replica:
        """The healthy replica with fewest requests in flight (round-robin among equals)."""
        now = self._clock()
        healthy = [r for r in self.replicas if r.unhealthy_until <= now]
        choices = [r for r in healthy if r.url != avoid] or healthy
        if not choices:  # all sitting out: try the one that recovers first rather than give up
            choices = [min(self.replicas, key=lambda r: (r.url == avoid, r.unhealthy_until))]
        replica = min(choices, key=lambda r: (r.in_flight, r.last_pick))
        replica.last_pick = next(self._picks)
        return replica

    def mark_failed(self, replica: Replica) -> None:
        replica.failures += 1
        replica.unhealthy_until = self._clock() + self.unhealthy_for_s

    def mark_ok(self, replica: Replica) -> None:
        replica.failures = 0
        replica.unhealthy_until = 0.0


def _root_url(url: str) -> str:
    url = url.rstrip("/")
    return url.removesuffix("/v1")


def _error_message(raw: bytes) -> str:
    try:
        data = json.loads(raw)
        err = data.get("error", data) if isinstance(data, dict) else data
        msg = err.get("message") or err.get("detail") if isinstance(err, dict) else None
        if msg:
            return str(msg)[:_ERROR_TEXT_LIMIT]
    except (ValueError, AttributeError):
        pass
    return raw[:_ERROR_TEXT_LIMIT].decode("utf-8", "replace") or "(empty body)"


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers["retry-after"])
    except (KeyError, ValueError):
        return None


class ChatStream:
    """An open streamed completion: the first event is already read; iterate the parsed chunks."""

    def __init__(
        self, client: VLLMClient, replica: Replica, response: httpx.Response,
        lines: AsyncIterator[str], first: dict[str, Any] | None, deadline: float,
    ) -> None:
        self._client = client
        self.replica = replica
        self._response = response
        self._lines = lines
        self._first = first
        self._deadline = deadline
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        try:
            if self._first is None:
                return
            yield self._first
            while True:
                event = await self._next_event()
                if event is None:
                    return
                yield event
        finally:
            await self.aclose()

    async def _next_event(self) -> dict[str, Any] | None:
        try:
            async with asyncio.timeout_at(self._deadline):
                return await _read_event(self._lines)
        except TimeoutError as exc:
            raise ModelUnavailable("the model did not finish within the deadline") from exc
        except httpx.TransportError as exc:
            # tokens already flowed to the caller: never retried, reported as one error event
            raise ModelUnavailable(f"the model stream broke: {type(exc).__name__}") from exc

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._client._release(self.replica)
            await self._response.aclose()


async def _read_event(lines: AsyncIterator[str]) -> dict[str, Any] | None:
    """The next ``data:`` JSON event of an SSE stream; None at ``[DONE]``.

    The end of the body without ``[DONE]`` is an error: vLLM always sends it, so its absence means
    a truncated stream or a body that was never SSE (a proxy page, plain JSON), not a finished answer.
    """
    async for line in lines:
        if not line.startswith("data:"):
            continue  # blank separators, comments, ``event:`` lines
        data = line[5:].strip()
        if data == "[DONE]":
            return None
        try:
            event = json.loads(data)
        except ValueError as exc:
            raise UpstreamError(f"the model server sent a malformed stream event: {data[:80]!r}") from exc
        if not isinstance(event, dict):
            raise UpstreamError("the model server sent a stream event that is not an object")
        if "error" in event:
            err = event["error"]
            msg = err.get("message") if isinstance(err, dict) else str(err)
            raise UpstreamError(f"the model failed mid-answer: {msg}")
        return event
    raise UpstreamError("the model server's stream ended without [DONE] (truncated, or not an SSE stream)")


class VLLMClient:
    """Chat completions and tokenization against one or several vLLM replicas serving ``model``."""

    def __init__(
        self,
        urls: list[str],
        model: str,
        *,
        api_key: str = "",
        http: httpx.AsyncClient | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        connect_timeout_s: float = 3.0,
        read_timeout_s: float = 60.0,
        deadline_s: float = 120.0,
        retry_attempts: int = 3,
        unhealthy_for_s: float = 10.0,
        backoff_base_s: float = 0.2,
        backoff_max_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model = model
        self.pool = ReplicaPool(urls, unhealthy_for_s, clock)
        self.deadline_s = deadline_s
        self.retry_attempts = retry_attempts
        self.backoff_max_s = backoff_max_s
        self._jitter = wait_random_exponential(multiplier=backoff_base_s, max=backoff_max_s)
        self._timeout = httpx.Timeout(read_timeout_s, connect=connect_timeout_s)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(transport=transport, timeout=self._timeout)

    @classmethod
    def from_settings(
        cls, settings: Settings, *, http: httpx.AsyncClient | None = None, urls: list[str] | None = None,
        model: str | None = None, transport: httpx.AsyncBaseTransport | None = None,
    ) -> VLLMClient:
        """The answering model's client (``urls``/``model`` override it, e.g. for the re-ranker)."""
        return cls(
            urls or settings.vllm_url, model or settings.vllm_model, api_key=settings.vllm_api_key,
            http=http, transport=transport, connect_timeout_s=settings.vllm_connect_timeout_s,
            read_timeout_s=settings.vllm_read_timeout_s, deadline_s=settings.vllm_deadline_s,
            retry_attempts=settings.vllm_retry_attempts, unhealthy_for_s=settings.vllm_unhealthy_for_s,
        )

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.pool.replicas]

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    # ------------------------------------------------------------------ public calls
    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /v1/chat/completions, not streamed; the parsed response (retried while transient)."""
        payload = self._payload(body, stream=False)

        async def attempt(replica: Replica) -> dict[str, Any]:
            response = await self._send(replica, "POST", "/v1/chat/completions", payload)
            data = _json_object(response)
            if not isinstance(data.get("choices"), list) or not data["choices"]:
                raise UpstreamError("the model server answered without choices")
            return data

        return await self._call(attempt)

    async def tokenize(self, text: str) -> list[int]:
        """POST /tokenize: the served model's token ids for ``text`` (no special tokens added)."""
        payload = {"model": self.model, "prompt": text, "add_special_tokens": False}

        async def attempt(replica: Replica) -> list[int]:
            data = _json_object(await self._send(replica, "POST", "/tokenize", payload))
            tokens = data.get("tokens")
            if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
                raise UpstreamError("the model server's /tokenize answer has no token list")
            return tokens

        return await self._call(attempt)

    async def open_stream(self, body: dict[str, Any]) -> ChatStream:
        """Start a streamed completion and read its first event (retrying until then)."""
        payload = self._payload(body, stream=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.deadline_s

        async def attempt(replica: Replica) -> ChatStream:
            request = self._http.build_request(
                "POST", f"{replica.url}/v1/chat/completions", json=payload, headers=self._headers,
                timeout=self._timeout,
            )
            replica.in_flight += 1
            response: httpx.Response | None = None
            try:
                response = await self._http.send(request, stream=True)
                await self._check_status(replica, response)
                lines = response.aiter_lines()
                first = await _read_event(lines)
            except httpx.TransportError as exc:
                self._release(replica)
                if response is not None:
                    await response.aclose()
                raise _Transient(f"{replica.url}: {type(exc).__name__}: {exc}") from exc
            except BaseException:
                self._release(replica)
                if response is not None:
                    await response.aclose()
                raise
            self.pool.mark_ok(replica)
            return ChatStream(self, replica, response, lines, first, deadline)

        return await self._call(attempt)

    async def stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Convenience: open a stream and yield its chunks."""
        opened = await self.open_stream(body)
        async for chunk in opened:
            yield chunk

    async def probe(self, timeout_s: float = 2.0) -> dict[str, str]:
        """GET /v1/models on every replica: ``{url: "ok" | reason}``; a success clears a sit-out."""

        async def one(replica: Replica) -> str:
            try:
                response = await self._http.get(
                    f"{replica.url}/v1/models", headers=self._headers, timeout=timeout_s
                )
                if response.status_code != 200:
                    return f"HTTP {response.status_code}"
                served = [m.get("id") for m in response.json().get("data", [])]
            except (httpx.HTTPError, ValueError, AttributeError) as exc:
                return type(exc).__name__
            if self.model not in served:
                return f"model {self.model!r} not served (serves {served})"
            self.pool.mark_ok(replica)
            return "ok"

        results = await asyncio.gather(*(one(r) for r in self.pool.replicas))
        return {r.url: res for r, res in zip(self.pool.replicas, results)}

    # ------------------------------------------------------------------ internals
    def _payload(self, body: dict[str, Any], *, stream: bool) -> dict[str, Any]:
        payload = dict(body)
        payload.setdefault("model", self.model)
        payload["stream"] = stream
        if not stream:
            payload.pop("stream_options", None)
        return payload

    def _release(self, replica: Replica) -> None:
        replica.in_flight = max(0, replica.in_flight - 1)

    async def _send(self, replica: Replica, method: str, path: str, payload: dict[str, Any]) -> httpx.Response:
        replica.in_flight += 1
        try:
            response = await self._http.request(
                method, f"{replica.url}{path}", json=payload, headers=self._headers, timeout=self._timeout
            )
        except httpx.TransportError as exc:
            raise _Transient(f"{replica.url}: {type(exc).__name__}: {exc}") from exc
        finally:
            self._release(replica)
        await self._check_status(replica, response)
        self.pool.mark_ok(replica)
        return response

    async def _check_status(self, replica: Replica, response: httpx.Response) -> None:
        status = response.status_code
        if 200 <= status < 300:
            return
        message = _error_message(await response.aread())
        if status in TRANSIENT_STATUS:
            # 429 means busy, not broken: retry, but do not make the replica sit out
            raise _Transient(f"{replica.url} answered {status}: {message}",
                             mark_unhealthy=status != 429, retry_after=_retry_after(response))
        if status in (400, 422):
            raise InvalidInput(f"the model refused the request: {message}", code="model_rejected")
        raise UpstreamError(f"the model server answered {status}: {message}")

    def _wait(self, state: RetryCallState) -> float:
        delay = self._jitter(state)
        exc = state.outcome.exception() if state.outcome else None
        hinted = getattr(exc, "retry_after", None) or 0.0
        return min(max(delay, hinted), self.backoff_max_s)

    async def _call(self, attempt: Callable[[Replica], Awaitable[T]]) -> T:
        """Run ``attempt`` on a replica, retrying transient failures within attempts and deadline."""
        last_url: str | None = None
        errors: list[str] = []

        def before_sleep(state: RetryCallState) -> None:
            log.info("vLLM attempt %d failed (%s); retrying", state.attempt_number, errors[-1])

        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.retry_attempts) | stop_before_delay(self.deadline_s),
            wait=self._wait, retry=retry_if_exception_type(_Transient), reraise=True,
            before_sleep=before_sleep,
        )
        try:
            async with asyncio.timeout(self.deadline_s):
                async for try_ in retrying:
                    with try_:
                        replica = self.pool.pick(avoid=last_url)
                        last_url = replica.url
                        try:
                            return await attempt(replica)
                        except _Transient as exc:
                            errors.append(str(exc))
                            if exc.mark_unhealthy:
                                self.pool.mark_failed(replica)
                            raise
        except _Transient as exc:
            raise ModelUnavailable(
                f"the model is unavailable after {len(errors)} attempt(s): {exc}",
                retry_after=max(1.0, self.pool.unhealthy_for_s),
            ) from exc
        except TimeoutError as exc:
            raise ModelUnavailable(
                f"the model did not answer within {self.deadline_s:g}s", retry_after=5.0
            ) from exc
        except VlmragError:
            raise
        raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError as exc:
        raise UpstreamError("the model server answered with something that is not JSON") from exc
    if not isinstance(data, dict):
        raise UpstreamError("the model server answered with JSON that is not an object")
    return data
