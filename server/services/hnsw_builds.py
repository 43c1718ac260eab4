"""HNSW builds of the embedded store while the server serves: one background job per knowledge base.

``POST /v1/knowledge-bases/{name}/optimize`` (and ``vlmrag optimize`` against a running server) starts
one; with ``VLMRAG_HNSW_AUTO`` the server also starts one after an ingestion once the KB holds
``VLMRAG_HNSW_MIN_POINTS`` points of which at least ``AUTO_UNINDEXED_SHARE`` are not in a graph (the
exact-scanned tail then costs that share of a full scan). The build itself is
``retriever/store/hnsw.py::build_while_serving``: a child process on a copy, then a swap. A Qdrant
server builds HNSW itself, so there it is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from retriever.errors import Conflict
from retriever.knowledge_base import KnowledgeBase
from retriever.store.base import VECTOR_NAMES, VectorStore
from retriever.store.hnsw import HnswParams, default_build_threads
from server.metrics import Metrics
from server.settings import Settings

log = logging.getLogger(__name__)

#: With VLMRAG_HNSW_AUTO, rebuild once this share of the points is outside every graph.
AUTO_UNINDEXED_SHARE = 0.2
#: ... but not within this long of a failed build (a copy and a build cost minutes of a core at 1M).
AUTO_RETRY_AFTER_S = 600.0
BuildState = Literal["running", "done", "failed", "not_needed"]


@dataclass(slots=True)
class HnswBuild:
    """One build of one KB's store: what ``GET /v1/knowledge-bases/{name}/optimize`` shows."""

    kb: str
    state: BuildState
    trigger: Literal["api", "auto"] = "api"
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    points: int = 0
    reason: str = ""  # why nothing was built, or why the build failed
    result: dict[str, Any] = field(default_factory=dict)  # BuildResult.to_dict() once done

    def to_dict(self) -> dict[str, Any]:
        return {"kb": self.kb, "state": self.state, "trigger": self.trigger, "started_at": self.started_at,
                "finished_at": self.finished_at, "points": self.points, "reason": self.reason, "result": self.result}


def unindexed_points(info: dict[str, int]) -> int:
    """Points outside every HNSW graph (``indexed_vectors`` counts each dense vector of each point).

    An estimate: the ``passage`` vectors of text snippets count too, so a collection with them reads a
    little low here (a build then starts somewhat later, never for an indexed collection).
    """
    return max(0, info["points"] - info["indexed_vectors"] // len(VECTOR_NAMES))


class HnswBuilds:
    """The builds of this server, at most one running per KB; the last one of each KB is kept for status."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        threads = settings.hnsw_build_threads or default_build_threads()
        self.params = HnswParams(m=settings.hnsw_m, ef_construct=settings.hnsw_ef_construct,
                                 max_indexing_threads=threads)
        self._builds: dict[str, HnswBuild] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def status(self, kb_name: str) -> HnswBuild | None:
        return self._builds.get(kb_name)

    def running(self, kb_name: str) -> bool:
        task = self._tasks.get(kb_name)
        return task is not None and not task.done()

    async def start(self, kb_name: str, kb: KnowledgeBase, *, force: bool = False,
                    trigger: Literal["api", "auto"] = "api") -> HnswBuild:
        """Start a build (state ``running``) or say why none is needed; ``Conflict`` while one runs."""
        if self.running(kb_name):
            raise Conflict(f"an HNSW build of knowledge base {kb_name!r} is already running")
        store = kb.store
        if not store.local_index_build:
            return self._record(HnswBuild(kb_name, "not_needed", trigger, reason="a Qdrant server builds HNSW itself"))
        info = await store.index_info()
        build = HnswBuild(kb_name, "running", trigger, points=info["points"])
        if not info["segments"]:
            build.state, build.reason = "not_needed", "the knowledge base is empty"
        elif info["points"] < self.settings.hnsw_min_points and not force:
            build.state, build.reason = "not_needed", (
                f"{info['points']} points < VLMRAG_HNSW_MIN_POINTS={self.settings.hnsw_min_points}: "
                "the exact scan is fast enough (force builds anyway)")
        if build.state != "running":
            build.finished_at = build.started_at
            return self._record(build)
        self._record(build)
        self._tasks[kb_name] = asyncio.create_task(self._run(build, store), name=f"vlmrag-hnsw-{kb_name}")
        log.info("HNSW build of knowledge base %s started (%s, %d points)", kb_name, trigger, info["points"])
        return build

    async def maybe_start(self, kb_name: str, kb: KnowledgeBase) -> HnswBuild | None:
        """After an ingestion: start a build if ``VLMRAG_HNSW_AUTO`` and the store has grown enough.

        Never raises: the ingestion it follows has succeeded, and a build can wait for the next one.
        """
        if not self.settings.hnsw_auto or self.running(kb_name) or not kb.store.local_index_build:
            return None
        last = self._builds.get(kb_name)
        if last is not None and last.state == "failed" and time.time() - (last.finished_at or 0) < AUTO_RETRY_AFTER_S:
            return None
        try:
            info = await kb.store.index_info()
            if info["points"] < max(1, self.settings.hnsw_min_points):
                return None
            if unindexed_points(info) < AUTO_UNINDEXED_SHARE * info["points"]:
                return None
            return await self.start(kb_name, kb, trigger="auto")
        except Exception as exc:  # noqa: BLE001 -- Conflict from a concurrent start included
            log.warning("HNSW auto-build of knowledge base %s not started: %s", kb_name, exc)
            return None

    async def _run(self, build: HnswBuild, store: VectorStore) -> None:
        try:
            result = await store.build_index(self.params)
        except asyncio.CancelledError:
            build.state, build.reason = "failed", "cancelled (shutdown or knowledge base deleted)"
            raise
        except Exception as exc:  # noqa: BLE001 -- reported on the status endpoint; the served shard is untouched
            build.state, build.reason = "failed", getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
            log.warning("HNSW build of knowledge base %s failed: %s", build.kb, build.reason)
        else:
            build.state, build.result, build.points = "done", result.to_dict(), result.points
            log.info("HNSW build of knowledge base %s done: %d points in %.1f s (%d writes replayed), serving %s",
                     build.kb, result.points, result.seconds, result.replayed_writes, result.shard)
        finally:
            build.finished_at = time.time()
            if self.metrics is not None:
                self.metrics.hnsw_builds.labels(build.state).inc()

    def _record(self, build: HnswBuild) -> HnswBuild:
        self._builds[build.kb] = build
        return build

    async def cancel(self, kb_name: str) -> None:
        """Stop the KB's running build (its child is killed, its copy removed)."""
        task = self._tasks.pop(kb_name, None)
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        build = self._builds.get(kb_name)
        if build is not None and build.state == "running":  # cancelled before it ever ran
            build.state, build.reason, build.finished_at = "failed", "cancelled before it started", time.time()

    async def close(self) -> None:
        for name in list(self._tasks):
            await self.cancel(name)
