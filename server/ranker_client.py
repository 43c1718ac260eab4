"""Client of the ranker: a vLLM started with ``--runner pooling`` on a cross-encoder, through ``/rerank``.

The same replicas, retries (tenacity) and error mapping as the answering model's client
(``server/vllm_client.py``), on the one httpx client the app builds; its deadline is
``ranker_timeout_s``. ``probe`` (``/readyz``) tells a ranker URL that serves a generative model
apart: such a vLLM has no ``/rerank`` route (404), so the check names ``VLMRAG_RANKER_URL`` and says
how to start the ranker.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from retriever.errors import UpstreamError
from retriever.ranker import RankInput
from server.settings import Settings
from server.vllm_client import Replica, VLLMClient, _json_object

RERANK_PATH = "/rerank"  # vLLM also serves /v1/rerank and /v2/rerank; /rerank logs no deprecation line
NOT_POOLING = ("serves no {path} (HTTP {status}): a generative model? VLMRAG_RANKER_URL must point at "
               "`vllm serve MODEL --runner pooling` with a one-label ranker (e.g. jinaai/jina-reranker-m0)")


class RankerClient(VLLMClient):
    """``/rerank`` against one or several pooling-runner vLLM replicas serving ``model``."""

    @classmethod
    def from_ranker_settings(cls, settings: Settings, *, http: httpx.AsyncClient | None = None,
                             transport: httpx.AsyncBaseTransport | None = None) -> RankerClient:
        """The ranker of ``ranker_url`` / ``ranker_model``; retries as ``vllm_*``, deadline ``ranker_timeout_s``."""
        return cls(
            settings.ranker_url, settings.ranker_model, api_key=settings.vllm_api_key, http=http,
            transport=transport, connect_timeout_s=settings.vllm_connect_timeout_s,
            read_timeout_s=settings.ranker_timeout_s, deadline_s=settings.ranker_timeout_s,
            retry_attempts=settings.vllm_retry_attempts, unhealthy_for_s=settings.vllm_unhealthy_for_s,
        )

    async def rerank(self, query: RankInput, documents: list[RankInput]) -> list[dict[str, Any]]:
        """POST /rerank with every document at once; the response's ``results`` (retried while transient)."""
        payload = {"model": self.model, "query": query, "documents": documents}

        async def attempt(replica: Replica) -> list[dict[str, Any]]:
            data = _json_object(await self._send(replica, "POST", RERANK_PATH, payload))
            results = data.get("results")
            if not isinstance(results, list):
                raise UpstreamError("the ranker answered without a results list")
            return results

        return await self._call(attempt)

    async def _check_status(self, replica: Replica, response: httpx.Response) -> None:
        """As the answering client's, but a missing /rerank route (a generative vLLM) names the setting."""
        if response.status_code in (404, 405):
            await response.aread()
            raise UpstreamError(f"ranker {replica.url} " + NOT_POOLING.format(path=RERANK_PATH,
                                                                            status=response.status_code),
                                code="ranker_not_pooling")
        await super()._check_status(replica, response)

    async def probe(self, timeout_s: float = 2.0) -> dict[str, str]:
        """Every replica: ``{url: "ok" | reason}``; the model must be served and answer a one-document /rerank."""
        served = await super().probe(timeout_s)

        async def one(replica: Replica) -> str:
            if served[replica.url] != "ok":
                return served[replica.url]
            body = {"model": self.model, "query": "ping", "documents": ["ping"]}
            try:
                response = await self._http.post(f"{replica.url}{RERANK_PATH}", json=body, headers=self._headers,
                                                 timeout=timeout_s)
            except httpx.HTTPError as exc:
                return type(exc).__name__
            if response.status_code in (404, 405):
                return NOT_POOLING.format(path=RERANK_PATH, status=response.status_code)
            if response.status_code != 200:
                return f"{RERANK_PATH} answered HTTP {response.status_code}"
            return "ok"

        results = await asyncio.gather(*(one(r) for r in self.pool.replicas))
        return {r.url: res for r, res in zip(self.pool.replicas, results)}
