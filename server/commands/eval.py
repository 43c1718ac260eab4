"""``vlmrag eval --coco ANNOTATIONS.json --images DIR --out OUTDIR [--limit N] [--pool 20] [--thresholds ...] [--answers]``.

Evaluates retrieval + relevancy re-ranking + adaptive selection on a COCO-captions set (each caption
is a text query whose ground truth is its own image): CLIP top-k (1, 3, 5), CLIP with a score
threshold and the re-ranker at several thresholds. Writes OUTDIR/results.json, results.md and
pr_curve.png; scores are cached in OUTDIR/records.jsonl, so an interrupted run resumes.

The images go into the evaluation's own knowledge base (``--kb-dir``, default OUTDIR/kb; with
VLMRAG_QDRANT_URL set, the collection ``<collection>_coco_eval`` on that server), never into the
main one. The re-ranker is the configured one (VLMRAG_RERANK_URL / VLMRAG_RERANK_MODEL, default
the answering vLLM); ``--answers`` also asks the answering model for an answer per query.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

from retriever.errors import InvalidInput
from retriever.eval.coco import (
    DEFAULT_THRESHOLDS,
    AnswerFn,
    CocoEval,
    EvalConfig,
    SnippetImages,
    kb_image_loader,
)
from retriever.eval.report import markdown_table
from retriever.ranker import RankerScorer
from retriever.rerank import RerankService, image_data_url
from retriever.scorers import SCORERS, threshold_scorers
from retriever.types import Candidate
from server.prompting import PromptBuilder, PromptSnippet
from server.ranker_client import RankerClient
from server.settings import Settings
from server.vllm_client import VLLMClient
from server.wiring import build_knowledge_base

ANSWER_MAX_TOKENS = 256


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "eval", help="Evaluate CLIP vs re-ranked adaptive selection on a COCO-captions set.",
        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--coco", type=Path, required=True, metavar="ANNOTATIONS.json", help="COCO captions JSON.")
    parser.add_argument("--images", type=Path, default=None, metavar="DIR",
                        help="Image folder (default: guessed next to the JSON).")
    parser.add_argument("--out", type=Path, required=True, metavar="OUTDIR", help="Results and score cache.")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="Only the first N images.")
    parser.add_argument("--captions-per-image", type=int, default=None, metavar="N",
                        help="Queries per image (default: every caption).")
    parser.add_argument("--pool", type=int, default=None, help="CLIP pool size N (default VLMRAG_RETRIEVAL_POOL).")
    parser.add_argument("--k", type=int, default=None, help="Adaptive selection keeps at most k (default VLMRAG_RETRIEVAL_K).")
    parser.add_argument("--thresholds", type=float, nargs="+", default=list(DEFAULT_THRESHOLDS),
                        help="Re-ranker relevancy thresholds.")
    parser.add_argument("--clip-thresholds", type=float, nargs="+", default=None,
                        help="CLIP-map thresholds (default: 9 between the 5th and 95th percentile seen).")
    parser.add_argument("--margin", type=float, default=None, help="Selection margin (default VLMRAG_RETRIEVAL_MARGIN).")
    parser.add_argument("--scorer", choices=threshold_scorers(), default=None,
                        help="A scorer whose scores a threshold applies to (default VLMRAG_RERANK_SCORER).")
    parser.add_argument("--answers", action="store_true", help="Also generate and record an answer per query.")
    parser.add_argument("--kb-dir", type=Path, default=None, help="The evaluation's data dir (default OUTDIR/kb).")
    parser.add_argument("--fresh", action="store_true", help="Discard cached scores in OUTDIR.")
    parser.add_argument("--no-progress", action="store_true", help="No progress bars.")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per scored candidate otherwise
    return asyncio.run(_run(args, settings))


def eval_settings(settings: Settings, out: Path, kb_dir: Path | None) -> Settings:
    """The settings of the evaluation's own knowledge base."""
    update: dict[str, Any] = {"data_dir": kb_dir or out / "kb"}
    if settings.qdrant_url:
        update["collection"] = f"{settings.collection}_coco_eval"
    return settings.model_copy(update=update)


def build_answer_fn(kb: SnippetImages, answer_client: VLLMClient) -> AnswerFn:
    """question + kept snippets → the answering model's reply (our system and answer prompts)."""
    prompts = PromptBuilder()
    load = kb_image_loader(kb)

    async def answer(question: str, kept: list[Candidate]) -> str:
        snippets = []
        for n, cand in enumerate(kept, start=1):
            data = await load(cand) if cand.payload.image_ref else None
            url = image_data_url(data) if data else None
            p = cand.payload
            snippets.append(PromptSnippet(n, p.kind, p.text, p.source, p.page, url))
        messages = prompts.build_messages([{"role": "user", "content": question}], snippets)
        response = await answer_client.complete({"messages": messages, "max_tokens": ANSWER_MAX_TOKENS, "temperature": 0})
        return str(response["choices"][0].get("message", {}).get("content") or "")

    return answer


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    for name in ("limit", "captions_per_image", "pool", "k"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InvalidInput(f"--{name.replace('_', '-')} must be at least 1, not {value}", param=name)
    if any(not 0.0 <= t <= 1.0 for t in args.thresholds):
        raise InvalidInput("--thresholds must lie in [0, 1] (relevancy is a probability)", param="thresholds")
    scorer = args.scorer or settings.rerank_scorer
    uses_model = SCORERS[scorer].uses_model
    ranks = scorer == RankerScorer.name  # the ranker, not the VLM (VLMRAG_RANKER_*)
    config = EvalConfig(
        annotations=args.coco, images_dir=args.images, limit=args.limit, captions_per_image=args.captions_per_image,
        pool=args.pool or settings.retrieval_pool, k=args.k or settings.retrieval_k,
        thresholds=tuple(args.thresholds), clip_thresholds=tuple(args.clip_thresholds) if args.clip_thresholds else None,
        margin=args.margin if args.margin is not None else settings.retrieval_margin, scorer=scorer,
        rerank_model=(settings.ranker_model if ranks else settings.effective_rerank_model) if uses_model else "",
        answer_threshold=settings.retrieval_threshold,
    )
    kb = await build_knowledge_base(eval_settings(settings, args.out, args.kb_dir))
    clients: list[VLLMClient] = []
    try:
        backend = None
        if uses_model and not ranks:
            backend = VLLMClient.from_settings(settings, urls=settings.effective_rerank_url,
                                               model=settings.effective_rerank_model)
            clients.append(backend)
        answer_fn = None
        if args.answers:
            answer_client = VLLMClient.from_settings(settings)
            clients.append(answer_client)
            answer_fn = build_answer_fn(kb, answer_client)
        ranker = None
        if ranks and settings.ranker_url:
            ranker = RankerClient.from_ranker_settings(settings)
            clients.append(ranker)
        reranker = RerankService(backend, kb_image_loader(kb), concurrency=settings.rerank_concurrency,
                                 timeout_s=settings.rerank_timeout_s, ranker=ranker)
        show = not args.no_progress and sys.stderr.isatty()
        outcome = await CocoEval(kb, reranker, config, args.out, answer_fn=answer_fn, progress=show,
                                 fresh=args.fresh).run()
    finally:
        for client in clients:
            await client.aclose()
        await kb.close()
    print(markdown_table(outcome.results))
    for name, path in outcome.paths.items():
        print(f"{name}: {path}")
    degraded = outcome.summary["degraded_queries"]
    if degraded:
        print(f"warning: the re-ranker failed for {degraded} queries (scored with CLIP instead, not cached); "
              "check the vLLM server and run again to score them", file=sys.stderr)
        if degraded == outcome.summary["dataset"]["queries"]:
            return 1
    return 0
