"""Follow-up questions: pool recall@5 of the answering page for ``retrieval.query`` = last, recent, rewrite.

    .venv/bin/python benchmarks/bench_followups.py             # 12 devices, 192 conversations (~4 min)
    .venv/bin/python benchmarks/bench_followups.py --quick     # 3 devices
    .venv/bin/python benchmarks/bench_followups.py --no-rewrite
    .venv/bin/python benchmarks/bench_followups.py --vllm-url http://gpu:8000 --vllm-model Qwen/Qwen2.5-VL-3B-Instruct

Constructed two-turn conversations over the support KB of ``benchmarks/support_kb.py`` (ingested with
OCR, tiny random CLIP: the dense half is noise, BM25 and OCR are real):

- ``code_text``: "My AquaPure 2000 shows E-417." / a neutral assistant reply / "How do I fix it?";
- ``part_text``: "I need the spare part P-101-B for my AquaPure 2000." / reply / "Where can I order it?";
- ``code_photo``: a display photo + "My display shows this." / reply / "What should I do?" (text only).

The assistant reply never repeats the identifier, so the follow-up can only be answered from turn 1.
Each conversation's search query comes from ``server/services/followups.py`` exactly as the chat
service builds it (``last_query``, ``recent_query`` with ``retrieval_recent_chars``, ``rewrite_query``
with ``retrieval_rewrite_max_tokens``), the query images are the turns it names, and the search is
``KnowledgeBase.search`` with ``mode=hybrid`` and query-time OCR. ``rewrite`` calls a real tiny vLLM
(``start_tiny_vllm``: CPU, random weights) through ``VLLMClient.complete``: its rewrite is junk text,
so its row measures the plumbing and the latency of one rewrite call, not what a real model would
write; ``--vllm-url`` rewrites with a running (real) model instead. A reference row searches turn 1 alone (the question as if asked stand-alone).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# benchmarks/ itself is on sys.path when this runs as a script
from bench_support import NOISE, build_kb, decode, key_of, load_tiny_embedder, query_ocr_fn
from support_kb import SupportQuery, SupportSnippet, build_support_kb

from retriever.knowledge_base import KnowledgeBase
from retriever.ocr import OcrEngine
from retriever.plan import RetrievalPlan
from retriever.search import OcrFn
from server.services.followups import SearchQuery, last_query, recent_query, rewrite_query, text_of
from server.settings import Settings

QUERY_MODES = ("last", "recent", "rewrite")
KINDS = ("code_text", "part_text", "code_photo")
REPLY = "Sorry to hear that. Let me look it up in the manual for you."
FOLLOW_UPS = {
    "code_text": ("How do I fix it?", "What should I do now?", "How do I make it go away?"),
    "part_text": ("Where can I order it?", "How do I get one?", "Is it still available?"),
    "code_photo": ("What should I do?", "How do I fix it?", "What does it mean?"),
}


@dataclass(slots=True)
class Case:
    """One two-turn conversation and its answer (the primary page)."""

    kind: str
    messages: list[dict[str, Any]]
    images: dict[int, Image.Image]  # message index -> decoded photo
    primary: str
    relevant: list[str]


@dataclass(slots=True)
class Outcome:
    hit1: bool
    hit5: bool
    any5: bool
    timings: dict[str, float] = field(default_factory=dict)
    text: str = ""
    degraded: list[str] = field(default_factory=list)


def device_of(page: SupportSnippet) -> str:
    """The product name from a manual page's heading ("## AquaPure 2000: error codes …")."""
    return page.text.splitlines()[0].removeprefix("## ").split(":")[0]


def photo_url(data: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")


def build_cases(
    snippets: list[SupportSnippet], queries: list[SupportQuery], settings: Settings, seed: int,
) -> list[Case]:
    """The constructed conversations, from the generator's identifier and display-photo queries."""
    rng = random.Random(seed)
    pages = {s.key: s for s in snippets}
    cases = []
    for q in queries:
        device = device_of(pages[q.primary])
        if q.kind == "identifier" and q.identifier.startswith(("E-", "P-")):
            kind = "code_text" if q.identifier.startswith("E-") else "part_text"
            first = (f"My {device} shows {q.identifier}." if kind == "code_text"
                     else f"I need the spare part {q.identifier} for my {device}.")
            content: Any = first
            images: dict[int, Image.Image] = {}
        elif q.kind == "display_photo" and q.image is not None:
            kind = "code_photo"
            content = [{"type": "image_url", "image_url": {"url": photo_url(q.image)}},
                       {"type": "text", "text": "My display shows this."}]
            images = {0: decode(q.image, settings)}
        else:
            continue
        messages = [{"role": "user", "content": content}, {"role": "assistant", "content": REPLY},
                    {"role": "user", "content": rng.choice(FOLLOW_UPS[kind])}]
        cases.append(Case(kind, messages, images, q.primary, list(q.relevant)))
    return cases


async def search_with(
    kb: KnowledgeBase, case: Case, query: SearchQuery, ocr: OcrFn | None, pool: int,
) -> Outcome:
    """Search ``query`` (hybrid + query OCR) with the images of the turns it names; hits of the primary page."""
    images = [case.images[i] for i in query.image_turns if i in case.images]
    found = await kb.search(query.text or None, images or None, RetrievalPlan(pool=pool, mode="hybrid"), ocr=ocr)
    keys = [key_of(c) for c in found.candidates]
    timings = {**query.timings, **{k: v for k, v in found.timings.items()}}
    return Outcome(case.primary in keys[:1], case.primary in keys[:5], bool(set(case.relevant) & set(keys[:5])),
                   timings, query.text, list(query.degraded))


async def run_cases(
    kb: KnowledgeBase, cases: list[Case], settings: Settings, ocr: OcrFn,
    complete: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]] | None,
) -> dict[str, list[tuple[str, Outcome]]]:
    """Every case under every query mode (searches interleaved per case); mode -> [(case kind, outcome)]."""
    results: dict[str, list[tuple[str, Outcome]]] = {m: [] for m in ("turn 1 alone", *QUERY_MODES)}
    pool = settings.retrieval_pool
    # The rewrite calls first, all of them: a CPU vLLM busy on this 2-core box right before a search
    # would slow that search's OCR (in production the model runs elsewhere).
    rewritten: list[SearchQuery | None] = []
    for case in cases:
        if complete is None:
            rewritten.append(None)
            continue
        t = time.perf_counter()
        query = await rewrite_query(case.messages, complete, max_tokens=settings.retrieval_rewrite_max_tokens,
                                    budget_chars=settings.retrieval_recent_chars)
        query.timings["rewrite"] = (time.perf_counter() - t) * 1000
        rewritten.append(query)
    started = time.perf_counter()
    for n, (case, rewrite) in enumerate(zip(cases, rewritten, strict=True), start=1):
        queries: dict[str, SearchQuery | None] = {
            "turn 1 alone": SearchQuery(text_of(case.messages[0]["content"]), [0], "turn1"),
            "last": last_query(case.messages),
            "recent": recent_query(case.messages, settings.retrieval_recent_chars),
            "rewrite": rewrite,
        }
        for mode, searched in queries.items():
            if searched is not None:
                results[mode].append((case.kind, await search_with(kb, case, searched, ocr, pool)))
        if n % 40 == 0:
            print(f"  {n}/{len(cases)} conversations searched, {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return results


def p50(values: list[float]) -> str:
    return f"{statistics.median(values):.1f}" if values else "–"


def print_table(results: dict[str, list[tuple[str, Outcome]]], rewrite_note: str) -> None:
    print("\n## follow-up questions: pool recall of the answering page (hybrid + query OCR, pool 20)")
    print(f"NOTE: {NOISE}. {rewrite_note}")
    print("| retrieval.query | " + " | ".join(f"{k} primary@5" for k in KINDS)
          + " | all primary@1 | all primary@5 | all any relevant@5 | rewrite p50 ms | ocr p50 ms | search p50 ms "
          "| degraded |")
    print("|---|" + "---:|" * (len(KINDS) + 6) + "---|")
    for mode, rows in results.items():
        if not rows:
            print(f"| {mode} | " + " | ".join("skipped" for _ in range(len(KINDS) + 7)) + " |")
            continue
        per_kind = []
        for kind in KINDS:
            hits = [o.hit5 for k, o in rows if k == kind]
            per_kind.append(f"{statistics.fmean(hits):.3f} (n={len(hits)})" if hits else "–")
        outcomes = [o for _, o in rows]
        degraded = sum(bool(o.degraded) for o in outcomes)
        print(f"| {mode} | " + " | ".join(per_kind)
              + f" | {statistics.fmean(o.hit1 for o in outcomes):.3f} | {statistics.fmean(o.hit5 for o in outcomes):.3f}"
              f" | {statistics.fmean(o.any5 for o in outcomes):.3f}"
              f" | {p50([o.timings['rewrite'] for o in outcomes if 'rewrite' in o.timings])}"
              f" | {p50([o.timings['ocr'] for o in outcomes if 'ocr' in o.timings])}"
              f" | {p50([o.timings['search'] for o in outcomes])} | {degraded}/{len(outcomes)} |")
    rewrites = results.get("rewrite") or []
    if rewrites:
        times = sorted(o.timings["rewrite"] for _, o in rewrites)
        print(f"\nrewrite call latency (tiny CPU vLLM, max_tokens from settings): p50 {p50(times)} ms, "
              f"p90 {times[int(0.9 * (len(times) - 1))]:.1f} ms, max {times[-1]:.1f} ms over {len(times)} calls")
        print("sample rewrites (random weights, so junk is expected):")
        for _, o in rewrites[:3]:
            print(f"  {o.text[:100]!r}" + (f" (degraded: {o.degraded})" if o.degraded else ""))


async def bench(devices: int, seed: int, rewrite: bool, vllm_url: str | None, vllm_model: str) -> int:
    started = time.perf_counter()
    snippets, queries = build_support_kb(devices, seed=seed)
    print(f"support KB: {devices} devices, {len(snippets)} snippets; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at start")
    venv_python = Path(os.environ.get("VLLM_PYTHON") or Path(__file__).resolve().parents[1] / ".venv-vllm/bin/python")
    skipped = "" if rewrite else "rewrite skipped (--no-rewrite)."
    if rewrite and not vllm_url and not venv_python.exists():
        print(f"SKIPPING rewrite: no vLLM venv at {venv_python} (make vllm-venv creates it)")
        rewrite, skipped = False, f"rewrite skipped (no vLLM venv at {venv_python})."

    with tempfile.TemporaryDirectory(prefix="bench-followups-") as tmp:
        root = Path(tmp)
        server_task = None
        if rewrite and not vllm_url:
            from tests.support.vllm_server import start_tiny_vllm

            # vLLM starts (a child process, ~1-2 min on 2 cores) while the KB is OCR'd and ingested
            server_task = asyncio.create_task(asyncio.to_thread(start_tiny_vllm, root / "tiny-vlm"))
        embedder, clip_config = load_tiny_embedder(root)
        engine = OcrEngine()
        server = client = None
        try:
            engine.warm()
            built = await build_kb(root, "kb", clip_config, embedder, snippets, engine)
            print(f"KB ingested with OCR in {built.seconds:.1f} s")
            cases = build_cases(snippets, queries, built.settings, seed)
            ocr = query_ocr_fn(engine, built.settings)
            complete = None
            rewrite_note = skipped
            if rewrite and vllm_url:
                from server.vllm_client import VLLMClient

                client = VLLMClient([vllm_url], vllm_model, deadline_s=120, read_timeout_s=60)
                complete = client.complete
                rewrite_note = f"rewrite = {vllm_model} at {vllm_url}."
            if server_task is not None:
                try:
                    server = await server_task
                except Exception as exc:  # noqa: BLE001 - the other modes still measure something
                    print(f"SKIPPING rewrite: the tiny vLLM did not start: {exc}")
                    rewrite_note = "rewrite skipped (the tiny vLLM did not start)."
                else:
                    from server.vllm_client import VLLMClient

                    client = VLLMClient([server.url], server.served_model_name, deadline_s=120, read_timeout_s=60)
                    complete = client.complete
                    await complete({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})  # warm-up
                    rewrite_note = ("rewrite = the tiny vLLM with RANDOM weights: its query is junk, so the rewrite "
                                    "row measures plumbing (what gets searched: junk text + the earlier photo) and "
                                    "latency, not the quality of a real model's rewrite.")
            await built.kb.search("warm-up", list(cases[-1].images.values())[:1] or None, ocr=ocr)
            print(f"{len(cases)} conversations ({', '.join(f'{k} {sum(c.kind == k for c in cases)}' for k in KINDS)})")
            results = await run_cases(built.kb, cases, built.settings, ocr, complete)
            await built.kb.close()
        finally:
            if client is not None:
                await client.aclose()
            if server is not None:
                server.stop()
            elif server_task is not None:  # failed before the server was awaited: never leave it running
                started_server = await asyncio.gather(server_task, return_exceptions=True)
                if not isinstance(started_server[0], BaseException):
                    started_server[0].stop()
            engine.close()
    print_table(results, rewrite_note)
    print(f"\nwhole run {time.perf_counter() - started:.0f} s")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=12, help="product lines in the generated KB (default 12)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="3 devices")
    parser.add_argument("--no-rewrite", action="store_true", help="skip the rewrite mode (no vLLM)")
    parser.add_argument("--vllm-url", help="rewrite with this running vLLM (base URL) instead of the tiny one")
    parser.add_argument("--vllm-model", default="tiny-vlm", help="its served model name")
    args = parser.parse_args()
    return asyncio.run(bench(3 if args.quick else args.devices, args.seed, not args.no_rewrite, args.vllm_url,
                             args.vllm_model))


if __name__ == "__main__":
    sys.exit(main())
