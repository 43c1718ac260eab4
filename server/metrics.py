"""Prometheus metrics of one app, on its own ``CollectorRegistry`` (tests build many apps per process).

Stage latency (embed, search, rerank, generate, …), request latency by route template, MCP tool calls, tokens by
kind, errors by type, and the query-embedding cache (``vlmrag_embed_cache_*``, read from
``EmbedCache.stats()`` at scrape time). ``GET /metrics`` renders ``Metrics.render()``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from retriever.embed_cache import KINDS, EmbedCacheStats
from retriever.ocr_cache import OcrCacheStats

# Stage and request latencies span ~1 ms (search) to minutes (long generations).
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class CacheStatsSource(Protocol):
    """Anything with the ``EmbedCache.stats()`` method."""

    def stats(self) -> EmbedCacheStats: ...


class EmbedCacheCollector(Collector):
    """The embedding cache's own counters, read at scrape time (the cache keeps them; no double counting)."""

    def __init__(self) -> None:
        self.source: CacheStatsSource | None = None

    def collect(self) -> Iterator[Metric]:
        stats = self.source.stats() if self.source is not None else EmbedCacheStats()
        hits = CounterMetricFamily("vlmrag_embed_cache_hits", "Query embeddings served from the cache.",
                                   labels=["kind"])
        misses = CounterMetricFamily("vlmrag_embed_cache_misses", "Query embeddings computed (not cached).",
                                     labels=["kind"])
        for kind in KINDS:
            hits.add_metric([kind], stats.hits.get(kind, 0))
            misses.add_metric([kind], stats.misses.get(kind, 0))
        yield hits
        yield misses
        yield CounterMetricFamily("vlmrag_embed_cache_evictions", "Entries evicted by the LRU bounds.",
                                  value=stats.evictions)
        yield GaugeMetricFamily("vlmrag_embed_cache_entries", "Query embeddings cached now.", value=stats.entries)
        yield GaugeMetricFamily("vlmrag_embed_cache_bytes", "Bytes the cached entries take.", value=stats.bytes)


class OcrCacheCollector(Collector):
    """The query-photo OCR cache's counters (``vlmrag_ocr_cache_*``), read at scrape time."""

    def __init__(self) -> None:
        self.source: Any = None  # an OcrCache (its stats() method)

    def collect(self) -> Iterator[Metric]:
        stats = self.source.stats() if self.source is not None else OcrCacheStats()
        yield CounterMetricFamily("vlmrag_ocr_cache_hits", "Query photos whose text came from the cache.",
                                  value=stats.hits)
        yield CounterMetricFamily("vlmrag_ocr_cache_misses", "Query photos read by OCR (not cached).",
                                  value=stats.misses)
        yield CounterMetricFamily("vlmrag_ocr_cache_evictions", "OCR readings evicted by the LRU bounds.",
                                  value=stats.evictions)
        yield GaugeMetricFamily("vlmrag_ocr_cache_entries", "OCR readings cached now.", value=stats.entries)
        yield GaugeMetricFamily("vlmrag_ocr_cache_bytes", "Bytes the cached readings take.", value=stats.bytes)


class Metrics:
    """The app's collectors; methods take milliseconds/seconds as the callers measure them."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.stage_seconds = Histogram(
            "vlmrag_stage_seconds", "Latency of one pipeline stage.", ["stage"],
            registry=self.registry, buckets=_BUCKETS,
        )
        self.request_seconds = Histogram(
            "vlmrag_request_seconds", "HTTP request latency by route (to the last byte).",
            ["method", "route", "status"], registry=self.registry, buckets=_BUCKETS,
        )
        self.tokens = Counter(
            "vlmrag_tokens", "Tokens used by the answering model.", ["kind"], registry=self.registry,
        )
        self.errors = Counter(
            "vlmrag_errors", "Errors answered, by OpenAI error type.", ["type", "status"], registry=self.registry,
        )
        self.degraded = Counter(
            "vlmrag_degraded", "Requests answered with a degraded stage.", ["stage"], registry=self.registry,
        )

        # per knowledge base; the label set is bounded: only KBs that exist and the caller may use get here,
        # at most limit_knowledge_bases of them
        self.kb_requests = Counter(
            "vlmrag_kb_requests", "Requests answered per knowledge base.", ["kb", "kind"], registry=self.registry,
        )
        self.kb_tokens = Counter(
            "vlmrag_kb_tokens", "Answering-model tokens per knowledge base.", ["kb", "kind"], registry=self.registry,
        )
        self.hnsw_builds = Counter(
            "vlmrag_hnsw_builds", "HNSW builds of the embedded store beside the server, by outcome.", ["state"],
            registry=self.registry,
        )
        self.kb_ingested = Counter(
            "vlmrag_kb_ingested_snippets", "Snippets added per knowledge base.", ["kb"], registry=self.registry,
        )
        # MCP tools (server/mcp/): the label sets are bounded, tool names are a fixed set ("unknown" otherwise)
        self.mcp_tool_calls = Counter(
            "vlmrag_mcp_tool_calls", "MCP tool calls by tool and outcome (ok or the error type).", ["tool", "outcome"],
            registry=self.registry,
        )
        self.mcp_tool_seconds = Histogram(
            "vlmrag_mcp_tool_seconds", "MCP tool call latency (in the server, to the result).", ["tool"],
            registry=self.registry, buckets=_BUCKETS,
        )
        # answers checked against their sources (server/services/verification.py)
        self.verify_claims = Counter(
            "vlmrag_verify_claims", "Answer sentences checked against their sources, by verdict "
            "(supported, unsupported, unchecked: nothing checkable or the model check failed).", ["mode", "verdict"],
            registry=self.registry,
        )
        self.verify_answers = Counter(
            "vlmrag_verify_answers", "Answers checked, by outcome (supported, flagged, disclaimed) and where "
            "(chat: after an answer; api: POST /v1/verify).", ["mode", "source", "outcome"], registry=self.registry,
        )
        self.embed_cache = EmbedCacheCollector()
        self.registry.register(self.embed_cache)
        self.ocr_cache = OcrCacheCollector()
        self.registry.register(self.ocr_cache)

    def watch_embed_cache(self, cache: CacheStatsSource | None) -> None:
        """Export this cache's counters (the one CLIP embedder's, shared by every KB); None: zeros."""
        self.embed_cache.source = cache

    def watch_ocr_cache(self, cache: Any) -> None:
        """Export the query-photo OCR cache's counters (an ``OcrCache``); None: zeros."""
        self.ocr_cache.source = cache

    def observe_kb(self, kb: str, kind: str, usage: dict[str, int] | None = None) -> None:
        """One ``kind`` (chat, search, ask) request against ``kb``, with its token usage."""
        self.kb_requests.labels(kb, kind).inc()
        if usage:
            self.kb_tokens.labels(kb, "prompt").inc(usage.get("prompt_tokens", 0) or 0)
            self.kb_tokens.labels(kb, "completion").inc(usage.get("completion_tokens", 0) or 0)

    def observe_timings(self, timings_ms: dict[str, float]) -> None:
        """Record every stage of a timings dict (milliseconds; ``total`` is skipped)."""
        for stage, ms in timings_ms.items():
            if stage != "total":
                self.stage_seconds.labels(stage).observe(ms / 1000.0)

    def observe_usage(self, usage: dict[str, int] | None) -> None:
        if usage:
            self.tokens.labels("prompt").inc(usage.get("prompt_tokens", 0) or 0)
            self.tokens.labels("completion").inc(usage.get("completion_tokens", 0) or 0)

    def observe_error(self, type_: str, status: int) -> None:
        self.errors.labels(type_, str(status)).inc()

    def observe_degraded(self, stages: list[str]) -> None:
        for stage in stages:
            self.degraded.labels(stage).inc()

    def observe_mcp_tool(self, tool: str, outcome: str, seconds: float) -> None:
        """One MCP tool call: ``outcome`` is ``ok`` or the OpenAI error type it ended with."""
        self.mcp_tool_calls.labels(tool, outcome).inc()
        self.mcp_tool_seconds.labels(tool).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
