"""COCO-captions evaluation of retrieval + re-ranking + adaptive selection (``vlmrag eval``).

Protocol (as in RagVL's ``mscoco_pipeline.py`` and the re-ranking literature): ingest the images
(image vector only: the captions are the queries, so they are not stored as snippet text), use
every caption as a text query, retrieve the CLIP pool of N, score each candidate's relevancy,
then compare selection methods; a caption's ground truth is its own image.

Resumable: one JSON line per finished query in ``OUTDIR/records.jsonl`` (retrieved pool, scores,
scoring paths, latencies); a re-run skips the queries found there. Queries whose re-rank degraded
(vLLM down) are not cached, so a later run scores them properly. ``OUTDIR/run.json`` pins what the
cache depends on (dataset, pool, scorer, models); a different configuration needs ``fresh=True``.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from retriever.errors import ConfigurationError, InvalidInput
from retriever.eval.metrics import (
    MethodResult,
    QueryRecord,
    ScoredItem,
    auto_clip_thresholds,
    evaluate,
    pool_recall,
    recall_at,
    standard_methods,
)
from retriever.eval.report import write_reports
from retriever.ingest.pipeline import IngestReport, ProgressFn
from retriever.ingest.readers import IngestItem, read_coco
from retriever.plan import RetrievalPlan, Scorer
from retriever.progress import ProgressBar
from retriever.rerank import ImageLoader, RerankService, clip_relevancy
from retriever.selection import select_adaptive
from retriever.types import Candidate

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

RECORDS = "records.jsonl"
ANSWERS = "answers.jsonl"
MANIFEST = "run.json"
DEFAULT_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
AnswerFn = Callable[[str, list[Candidate]], Awaitable[str]]


class SnippetImages(Protocol):
    """Where a snippet's image bytes come from (``KnowledgeBase.snippet_image``)."""

    async def snippet_image(self, candidate: Candidate, *, thumbnail: bool = False) -> bytes | None: ...


class _EmbedderIdentity(Protocol):
    @property
    def identity(self) -> str: ...


class _Retrieved(Protocol):
    @property
    def candidates(self) -> list[Candidate]: ...


class EvalKnowledgeBase(SnippetImages, Protocol):
    """What the harness needs of a knowledge base (``retriever.knowledge_base.KnowledgeBase``)."""

    @property
    def embedder(self) -> _EmbedderIdentity | None: ...

    async def ingest(
        self, items: Iterable[IngestItem], tags: Iterable[str] = (), progress: ProgressFn | None = None,
        total: int | None = None,
    ) -> IngestReport: ...

    async def search(
        self, text: str | None = None, images: list[Image.Image] | None = None, plan: RetrievalPlan | None = None,
    ) -> _Retrieved: ...


@dataclass(frozen=True, slots=True)
class CocoQuery:
    """One caption used as a query; its ground truth is ``image_id``."""

    query_id: str  # the caption's annotation id (or image id + index when it has none)
    text: str
    image_id: str


@dataclass(slots=True)
class EvalConfig:
    """What to evaluate; ``cache_key`` fields must match for a resumed run."""

    annotations: Path
    images_dir: Path | None = None
    limit: int | None = None  # first N images (and their captions)
    captions_per_image: int | None = None  # None: every caption
    pool: int = 20
    k: int = 5
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    clip_thresholds: tuple[float, ...] | None = None  # None: derived from the data
    margin: float | None = None
    scorer: Scorer = "vlm"
    rerank_model: str = ""
    answer_threshold: float = 0.5

    def cache_key(self, embedder: str) -> dict[str, Any]:
        return {
            "annotations": str(Path(self.annotations).resolve()), "captions_per_image": self.captions_per_image,
            "pool": self.pool, "scorer": self.scorer, "rerank_model": self.rerank_model, "embedder": embedder,
        }


@dataclass(slots=True)
class EvalOutcome:
    """What a run produced."""

    results: list[MethodResult]
    summary: dict[str, Any]
    paths: dict[str, Path] = field(default_factory=dict)


# ------------------------------------------------------------------------------------- dataset
def load_coco(annotations: Path, *, limit: int | None = None,
              captions_per_image: int | None = None) -> tuple[list[str], list[CocoQuery]]:
    """Image ids (file order, first ``limit``) and the caption queries of those images."""
    try:
        data = json.loads(Path(annotations).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"cannot read COCO annotations {annotations}: {exc}", param="coco") from exc
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise InvalidInput(f"{annotations} is not a COCO captions file (needs 'images' and 'annotations')",
                           param="coco")
    image_ids = [str(im.get("id")) for im in data["images"] if isinstance(im, dict) and "file_name" in im]
    if limit is not None:
        image_ids = image_ids[:limit]
    wanted = set(image_ids)
    per_image: dict[str, list[CocoQuery]] = {}
    for n, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str) or not ann["caption"].strip():
            continue
        image_id = str(ann.get("image_id"))
        if image_id not in wanted:
            continue
        bucket = per_image.setdefault(image_id, [])
        if captions_per_image is not None and len(bucket) >= captions_per_image:
            continue
        qid = str(ann["id"]) if ann.get("id") is not None else f"{image_id}:{n}"
        bucket.append(CocoQuery(qid, ann["caption"].strip(), image_id))
    queries = [q for image_id in image_ids for q in per_image.get(image_id, [])]
    return image_ids, queries


def image_only_items(annotations: Path, images_dir: Path | None, limit: int | None) -> Iterator[IngestItem]:
    """COCO images as snippets without their caption text (the captions are the queries)."""
    items: Iterator[IngestItem] = read_coco(Path(annotations), images_dir)
    if limit is not None:
        items = itertools.islice(items, limit)
    for item in items:
        yield replace(item, text="", kind=None) if item.error is None else item


# ------------------------------------------------------------------------------------ the run
class CocoEval:
    """Runs the COCO protocol against a knowledge base and a re-ranker; writes the reports."""

    def __init__(
        self, kb: EvalKnowledgeBase, reranker: RerankService, config: EvalConfig, out_dir: Path, *,
        answer_fn: AnswerFn | None = None, progress: bool = True, fresh: bool = False,
    ) -> None:
        self.kb = kb
        self.reranker = reranker
        self.config = config
        self.out_dir = Path(out_dir)
        self.answer_fn = answer_fn
        self.progress = progress
        self.fresh = fresh

    def _embedder_identity(self) -> str:
        return self.kb.embedder.identity if self.kb.embedder is not None else ""

    # --- cache -----------------------------------------------------------------------------------
    def _prepare_out_dir(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        manifest = self.out_dir / MANIFEST
        key = self.config.cache_key(self._embedder_identity())
        if self.fresh:
            for name in (RECORDS, ANSWERS, MANIFEST):
                (self.out_dir / name).unlink(missing_ok=True)
        elif manifest.exists():
            old = json.loads(manifest.read_text(encoding="utf-8")).get("cache_key")
            if old != key:
                raise InvalidInput(
                    f"{self.out_dir} holds cached scores of a different run ({old}); "
                    "use another --out or --fresh to discard them", param="out")
        manifest.write_text(json.dumps({"cache_key": key}, indent=2) + "\n", encoding="utf-8")

    def _read_jsonl(self, name: str) -> dict[str, dict[str, Any]]:
        path = self.out_dir / name
        rows: dict[str, dict[str, Any]] = {}
        if not path.exists():
            return rows
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a line cut short by an interrupted run: that query is redone
                continue
            if isinstance(row, dict) and "query_id" in row:
                rows[str(row["query_id"])] = row
        return rows

    def _append(self, name: str, row: dict[str, Any]) -> None:
        with open(self.out_dir / name, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")

    # --- stages ----------------------------------------------------------------------------------
    async def ingest(self) -> dict[str, Any]:
        """Ingest the (first ``limit``) images; already stored ones are skipped by the pipeline."""
        items = image_only_items(self.config.annotations, self.config.images_dir, self.config.limit)
        with ProgressBar("ingesting", self.config.limit, enabled=self.progress) as bar:
            report = await self.kb.ingest(items, progress=lambda r: bar.update(r.done, throughput=r.ingested))
        if report.failed:
            log.warning("%d COCO images were not ingested: %s", report.failed,
                        "; ".join(f"{f.source}: {f.reason}" for f in report.failures[:5]))
        return {"ingested": report.ingested, "skipped_existing": report.skipped_existing, "failed": report.failed}

    async def score_query(self, query: CocoQuery) -> dict[str, Any]:
        """Retrieve the pool for one caption and score it; the JSON-able record row."""
        t0 = time.perf_counter()
        found = await self.kb.search(query.text, None, RetrievalPlan(pool=self.config.pool, mode="dense"))
        t1 = time.perf_counter()
        report = await self.reranker.score(query.text, [], found.candidates, scorer=self.config.scorer)
        t2 = time.perf_counter()
        return {
            "query_id": query.query_id, "text": query.text, "image_id": query.image_id,
            "retrieval_ms": (t1 - t0) * 1000, "rerank_ms": (t2 - t1) * 1000,
            "scorer": report.scorer, "degraded": report.degraded,
            "candidates": [
                {"id": c.id, "image_id": _image_id(c), "clip_score": c.clip_score,
                 "clip_relevancy": clip_relevancy(c), "relevancy": report.scores[c.id], "path": report.paths[c.id]}
                for c in found.candidates
            ],
            "_candidates": found.candidates,  # for --answers in this run; dropped before caching
        }

    async def answer(self, query: CocoQuery, row: dict[str, Any]) -> dict[str, Any]:
        """Select with the re-ranker at ``answer_threshold`` and ask the answering model."""
        candidates: list[Candidate] | None = row.get("_candidates")
        if candidates is None:  # a cached row: retrieve again (cheap), reuse the cached scores
            plan = RetrievalPlan(pool=self.config.pool, mode="dense")
            candidates = (await self.kb.search(query.text, None, plan)).candidates
        scores = {c["id"]: c["relevancy"] for c in row["candidates"]}
        candidates = [c for c in candidates if c.id in scores]
        for cand in candidates:
            cand.relevancy = scores[cand.id]
        kept = select_adaptive(candidates, k=self.config.k, threshold=self.config.answer_threshold,
                               margin=self.config.margin).kept
        if self.answer_fn is None:
            raise ConfigurationError("this evaluation was set up without an answering model (answer_fn)")
        text = await self.answer_fn(query.text, kept)
        return {"query_id": query.query_id, "query": query.text, "image_id": query.image_id,
                "kept": [_image_id(c) for c in kept], "answer": text}

    async def run(self) -> EvalOutcome:
        """Ingest, score every query not cached yet, evaluate all methods, write the reports."""
        self._prepare_out_dir()
        image_ids, queries = load_coco(self.config.annotations, limit=self.config.limit,
                                       captions_per_image=self.config.captions_per_image)
        if not queries:
            raise InvalidInput(f"no captions found in {self.config.annotations}", param="coco")
        ingest = await self.ingest()
        cached = self._read_jsonl(RECORDS)
        answered = self._read_jsonl(ANSWERS) if self.answer_fn else {}
        rows: dict[str, dict[str, Any]] = {}
        degraded = 0
        with ProgressBar("queries", len(queries), enabled=self.progress) as bar:
            for query in queries:
                row = cached.get(query.query_id)
                if row is None:
                    row = await self.score_query(query)
                    if row["degraded"]:  # not cached: a later run scores it properly
                        degraded += 1
                    else:
                        self._append(RECORDS, {k: v for k, v in row.items() if k != "_candidates"})
                if self.answer_fn and query.query_id not in answered:
                    self._append(ANSWERS, await self.answer(query, row))
                row.pop("_candidates", None)
                rows[query.query_id] = row
                bar.advance()
        records = [_record(rows[q.query_id]) for q in queries]
        clip_thresholds = list(self.config.clip_thresholds or auto_clip_thresholds(records))
        methods = standard_methods(self.config.k, self.config.thresholds, clip_thresholds, margin=self.config.margin)
        results = evaluate(records, methods)
        summary = {
            "dataset": {"annotations": str(self.config.annotations), "images": len(image_ids),
                        "queries": len(queries), **ingest},
            "pool": self.config.pool, "k": self.config.k, "margin": self.config.margin,
            "scorer": self.config.scorer, "rerank_model": self.config.rerank_model,
            "embedder": self._embedder_identity(),
            "clip_recall_at": {str(n): recall_at(records, n) for n in (1, 5, 10) if n <= self.config.pool},
            "pool_recall": pool_recall(records),
            "score_paths": dict(Counter(c["path"] for row in rows.values() for c in row["candidates"])),
            "degraded_queries": degraded,
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.config).items()},
        }
        paths = write_reports(self.out_dir, summary, results)
        if self.answer_fn:
            paths["answers"] = self.out_dir / ANSWERS
        return EvalOutcome(results, summary, paths)


def kb_image_loader(kb: SnippetImages, *, thumbnail: bool = False) -> ImageLoader:
    """``load_image`` for RerankService: ``KnowledgeBase.snippet_image`` (None if unavailable), thumbnail or not."""

    async def load(candidate: Candidate) -> bytes | None:
        return await kb.snippet_image(candidate, thumbnail=thumbnail)

    return load


def _image_id(candidate: Candidate) -> str | None:
    value = candidate.payload.extra.get("coco_image_id")
    return None if value is None else str(value)


def _record(row: dict[str, Any]) -> QueryRecord:
    """A cached row as the metrics see it; items are identified by COCO image id."""
    items = [
        ScoredItem(id=c["image_id"] if c.get("image_id") is not None else f"point:{c['id']}",
                   clip_score=c["clip_score"], clip_relevancy=c["clip_relevancy"], relevancy=c["relevancy"])
        for c in row["candidates"]
    ]
    return QueryRecord(row["query_id"], frozenset({row["image_id"]}), items,
                       retrieval_ms=row["retrieval_ms"], rerank_ms=row["rerank_ms"])
