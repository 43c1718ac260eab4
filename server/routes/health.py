"""GET /healthz (process up), GET /readyz (store open and vLLM answering; the ranker, if any, is a pooling
model), GET /metrics (Prometheus)."""

from __future__ import annotations

import asyncio
from typing import Protocol, runtime_checkable

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from retriever.knowledge_base import KnowledgeBase
from retriever.rerank import ChatBackend
from server.api_models import HealthResponse, ReadinessChecks
from server.deps import MetricsDep, StateDep
from server.errors import error_body

router = APIRouter(tags=["health"])
_PROBE_TIMEOUT_S = 2.0


@runtime_checkable
class _Probed(Protocol):
    """A model client that can check its replicas (``VLLMClient.probe``)."""

    async def probe(self, timeout_s: float = 2.0) -> dict[str, str]: ...


@router.get("/healthz", response_model=HealthResponse, response_model_exclude_none=True)
async def healthz() -> HealthResponse:
    return HealthResponse(status="ok")


async def _store_check(kb: KnowledgeBase) -> str:
    try:
        await asyncio.wait_for(kb.count(), _PROBE_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready", reported by name
        return f"{type(exc).__name__}: {getattr(exc, 'message', exc)}"[:300]
    return "ok"


async def _model_check(client: ChatBackend) -> dict[str, str]:
    if not isinstance(client, _Probed):  # an injected backend without probing: trust it
        return {"injected": "ok"}
    return await client.probe(_PROBE_TIMEOUT_S)


@router.get("/readyz", response_model=HealthResponse)
async def readyz(state: StateDep) -> HealthResponse | JSONResponse:
    """200 when the store answers and at least one vLLM replica serves the model; else 503 (with the error too)."""
    store, model = await asyncio.gather(_store_check(state.knowledge_base), _model_check(state.answer_client))
    checks: ReadinessChecks = {"store": store, "vllm": model}
    if state.rerank_backend is not state.answer_client:
        checks["rerank_vllm"] = await _model_check(state.rerank_backend)  # informational: re-rank degrades
    if state.ranker is not None:  # informational too: the rerank scorer degrades to evidence
        checks["ranker"] = await state.ranker.probe(_PROBE_TIMEOUT_S)
    ready = store == "ok" and any(v == "ok" for v in model.values())
    if ready:
        return HealthResponse(status="ok", checks=checks)
    failing = "the store" if store != "ok" else "the model server"
    body = {"status": "unavailable", "checks": checks,
            **error_body(f"not ready: {failing} is unavailable", "service_unavailable", code="not_ready")}
    return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})


@router.get("/metrics", response_class=PlainTextResponse)  # documents the text/plain exposition format
async def metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.render(), media_type=metrics.content_type)
