"""Relevancy scoring of N candidates: all in flight together vs one after another, same vLLM, one run.

Goal: concurrent <= 1/4 of sequential at 20 candidates (vLLM batches the concurrent requests).

    .venv/bin/python benchmarks/bench_rerank.py                       # starts the tiny CPU vLLM
    .venv/bin/python benchmarks/bench_rerank.py --url http://gpu:8000 --model Qwen/Qwen2.5-VL-3B-Instruct

Two workloads, one server: half the candidates images (64x48 PNGs) and half text, then text
only (shows what image preprocessing in vLLM's front end costs); the query has text only. Rounds alternate
sequential / concurrent so drift (thermal, other load) hits both; the table shows medians.

``--ranker``: the ``rerank`` scorer (a cross-encoder on vLLM ``--runner pooling``, ONE /rerank call for
the pool) against the ``vlm`` scorer (all candidates in flight) on the same mixed pool, in one run. Goal:
rerank p50 <= 0.3x vlm. Without ``--url`` / ``--ranker-url`` it starts the tiny VLM, then (after stopping
it: one CPU vLLM at a time) the tiny random-weight ranker (``JinaVLForRanking``); it also probes the
VLM as if it were the ranker, to show the line /readyz gives for a generative model at VLMRAG_RANKER_URL.

    .venv/bin/python benchmarks/bench_rerank.py --ranker --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retriever.rerank import RerankService
from retriever.types import Candidate, SnippetPayload
from server.ranker_client import RankerClient
from server.vllm_client import VLLMClient


def make_candidates(n: int, with_images: bool = True, salt: int = 0) -> tuple[list[Candidate], dict[str, bytes]]:
    """n candidates, alternating image and text snippets (or text only); all prompts distinct.

    ``salt`` > 0 changes every text and pixel colour (a fresh pool: no prefix or image cache hits).
    """
    images: dict[str, bytes] = {}
    cands: list[Candidate] = []
    for i in range(n):
        if with_images and i % 2 == 0:
            buf = io.BytesIO()
            Image.new("RGB", (64, 48), ((37 * i + salt) % 256, (91 * i + 7 * salt) % 256,
                                        (53 * i + 13 * salt) % 256)).save(buf, "PNG")
            images[f"blob{i}"] = buf.getvalue()
            payload = SnippetPayload(kind="image", text="", image_ref=f"blob{i}")
        else:
            tag = f"{i}.{salt}" if salt else f"{i}"
            payload = SnippetPayload(kind="text", text=f"Snippet {tag}: a note about bicycles and city streets.")
        cands.append(Candidate(f"c{i:02d}", payload, clip_score=1.0 - i / n, vector_scores={"text->image": 0.3}))
    return cands, images


async def bench(url: str, model: str, n: int, concurrency: int, rounds: int, top_logprobs: int) -> int:
    """Both workloads against one server: half images (the realistic one), then text only."""
    for with_images in (True, False):
        if rc := await bench_one(url, model, n, concurrency, rounds, top_logprobs, with_images):
            return rc
    return 0


async def bench_one(
    url: str, model: str, n: int, concurrency: int, rounds: int, top_logprobs: int, with_images: bool,
) -> int:
    client = VLLMClient([url], model, deadline_s=300, read_timeout_s=300)
    cands, images = make_candidates(n, with_images)

    async def load(c: Candidate) -> bytes | None:
        return images.get(c.payload.image_ref or "")

    services = {
        "sequential": RerankService(client, load, concurrency=1, timeout_s=600, top_logprobs=top_logprobs),
        "concurrent": RerankService(client, load, concurrency=concurrency, timeout_s=600, top_logprobs=top_logprobs),
    }
    query = "a red bicycle leaning against a wall"
    times: dict[str, list[float]] = {name: [] for name in services}
    paths: Counter[str] = Counter()
    try:
        for service in services.values():  # warm-up: tokenizer ids, image processor, prefix cache
            report = await service.score(query, [], cands[:2])
            if report.degraded:
                print(f"scoring failed against {url}: {report.degraded}", file=sys.stderr)
                return 1
        for _ in range(rounds):
            for name, service in services.items():
                started = time.perf_counter()
                report = await service.score(query, [], cands)
                times[name].append(time.perf_counter() - started)
                paths.update(report.paths.values())
                if report.degraded:
                    print(f"{name}: degraded {report.degraded}", file=sys.stderr)
    finally:
        await client.aclose()
    seq, conc = statistics.median(times["sequential"]), statistics.median(times["concurrent"])
    n_images = len(images)
    print(f"\nrelevancy scoring of {n} candidates ({n_images} image, {n - n_images} text), {rounds} rounds, "
          f"vLLM {url} model {model}")
    print(f"score paths over all rounds: {dict(paths)}")
    print("| mode | concurrency | median s | min s | ms / candidate | vs sequential |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, value, cc in (("sequential", seq, 1), ("concurrent", conc, concurrency)):
        print(f"| {name} | {cc} | {value:.3f} | {min(times[name]):.3f} | {value / n * 1000:.1f} | {value / seq:.3f} |")
    verdict = "meets" if conc / seq <= 0.25 else "misses"
    print(f"\nconcurrent / sequential = {conc / seq:.3f} ({verdict} the goal <= 0.25)")
    return 0


class CountingTransport(httpx.AsyncBaseTransport):
    """The real network, counting requests by path (HTTP calls per question)."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.calls: Counter[str] = Counter()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.calls[request.url.path] += 1
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def time_scorer(
    scorer: str, n: int, rounds: int, *, backend: VLLMClient | None = None, ranker: RankerClient | None = None,
    transport: CountingTransport, concurrency: int = 20,
) -> tuple[list[float], float, list[str]]:
    """Seconds per round for ``scorer`` on a fresh mixed pool each round (no cache hits), HTTP calls per
    question, and any degradation."""
    images: dict[str, bytes] = {}

    async def load(c: Candidate) -> bytes | None:
        return images.get(c.payload.image_ref or "")

    service = RerankService(backend, load, concurrency=concurrency, timeout_s=600, ranker=ranker)
    query = "a red bicycle leaning against a wall"
    warm, images = make_candidates(2, True, salt=997)
    await service.score(query, [], warm, scorer=scorer)  # warm-up (tokenizer ids, image processor)
    transport.calls.clear()
    times: list[float] = []
    degraded: list[str] = []
    for round_ in range(1, rounds + 1):
        cands, images = make_candidates(n, True, salt=round_)
        started = time.perf_counter()
        report = await service.score(f"{query} ({round_})", [], cands, scorer=scorer)
        times.append(time.perf_counter() - started)
        degraded += report.degraded
    return times, sum(transport.calls.values()) / rounds, degraded


async def vlm_phase(url: str, model: str, n: int, rounds: int, concurrency: int) -> tuple[list[float], float, str]:
    """The vlm scorer's times and calls, and what the ranker probe says about this generative vLLM."""
    transport = CountingTransport()
    http = httpx.AsyncClient(transport=transport, timeout=300)
    client = VLLMClient([url], model, http=http, deadline_s=300, read_timeout_s=300)
    as_ranker = RankerClient([url], model, http=http)
    try:
        times, calls, degraded = await time_scorer("vlm", n, rounds, backend=client, transport=transport,
                                                   concurrency=concurrency)
        (probe,) = (await as_ranker.probe(10.0)).values()
    finally:
        await http.aclose()
    if degraded:
        print(f"vlm: degraded {sorted(set(degraded))}", file=sys.stderr)
    return times, calls, probe


async def ranker_phase(url: str, model: str, n: int, rounds: int) -> tuple[list[float], float]:
    transport = CountingTransport()
    http = httpx.AsyncClient(transport=transport, timeout=300)
    ranker = RankerClient([url], model, http=http, deadline_s=300, read_timeout_s=300)
    try:
        times, calls, degraded = await time_scorer("rerank", n, rounds, ranker=ranker, transport=transport)
    finally:
        await http.aclose()
    if degraded:
        print(f"rerank: degraded {sorted(set(degraded))}", file=sys.stderr)
    return times, calls


def compare_ranker(args: argparse.Namespace) -> int:
    """rerank vs vlm p50 on the same pool in one run; one CPU vLLM at a time."""
    import tempfile

    from tests.support.vllm_server import RANKER_ARGS, VLLMServer, build_tiny_vlm_dir

    extra = ["--max-num-seqs", str(max(args.candidates, 4))]  # room for the whole pool in one batch, both
    with tempfile.TemporaryDirectory() as tmp:
        if args.url:
            vlm = asyncio.run(vlm_phase(args.url, args.model, args.candidates, args.rounds, args.concurrency))
        else:
            with VLLMServer(build_tiny_vlm_dir(Path(tmp) / "vlm"), served_model_name=args.model, extra_args=extra,
                            startup_timeout=600) as server:
                print(f"tiny VLM up in {server.startup_seconds:.0f}s", file=sys.stderr)
                vlm = asyncio.run(vlm_phase(server.url, args.model, args.candidates, args.rounds,
                                            args.concurrency))
        if args.ranker_url:
            rerank = asyncio.run(ranker_phase(args.ranker_url, args.ranker_model, args.candidates, args.rounds))
        else:
            with VLLMServer(build_tiny_vlm_dir(Path(tmp) / "ranker", ranker=True), served_model_name=args.ranker_model,
                            extra_args=[*RANKER_ARGS, *extra], startup_timeout=600) as server:
                print(f"tiny ranker up in {server.startup_seconds:.0f}s", file=sys.stderr)
                rerank = asyncio.run(ranker_phase(server.url, args.ranker_model, args.candidates, args.rounds))
    (vlm_times, vlm_calls, probe), (rerank_times, rerank_calls) = vlm, rerank
    vlm_p50, rerank_p50 = statistics.median(vlm_times), statistics.median(rerank_times)
    n_images = (args.candidates + 1) // 2
    print(f"\nrerank vs vlm, {args.candidates} candidates ({n_images} image, {args.candidates - n_images} text), "
          f"{args.rounds} rounds, a fresh pool and query each round; vlm concurrency {args.concurrency}")
    print("| scorer | HTTP calls / question | p50 s | min s | vs vlm |")
    print("|---|---:|---:|---:|---:|")
    for name, times, calls in (("vlm", vlm_times, vlm_calls), ("rerank", rerank_times, rerank_calls)):
        p50 = statistics.median(times)
        print(f"| {name} | {calls:g} | {p50:.3f} | {min(times):.3f} | {p50 / vlm_p50:.3f} |")
    ratio = rerank_p50 / vlm_p50
    verdict = "meets" if ratio <= 0.3 and rerank_calls == 1 else "misses"
    print(f"\nrerank / vlm = {ratio:.3f} ({verdict} the goal <= 0.3, one call per question)")
    print(f"ranker probe of the answering (generative) vLLM: {probe}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="A running vLLM (base URL); default: start the tiny CPU model.")
    parser.add_argument("--model", default="tiny-vlm")
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--top-logprobs", type=int, default=20)
    parser.add_argument("--ranker", action="store_true", help="Compare the rerank scorer with vlm (see above).")
    parser.add_argument("--ranker-url", help="A running pooling-runner ranker; default: start the tiny one.")
    parser.add_argument("--ranker-model", default="tiny-ranker")
    args = parser.parse_args()
    if args.ranker:
        return compare_ranker(args)
    if args.url:
        return asyncio.run(bench(args.url, args.model, args.candidates, args.concurrency, args.rounds,
                                 args.top_logprobs))
    import tempfile

    from tests.support.vllm_server import VLLMServer, build_tiny_vlm_dir

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "tiny-vlm"
        build_tiny_vlm_dir(model_dir)
        # The test default caps a batch at 4 sequences; a batching benchmark needs room for all of them.
        extra = ["--max-num-seqs", str(max(args.concurrency, 4))]
        with VLLMServer(model_dir, served_model_name=args.model, extra_args=extra, startup_timeout=600) as server:
            print(f"tiny vLLM up in {server.startup_seconds:.0f}s (log {server.log_path})")
            return asyncio.run(bench(server.url, args.model, args.candidates, args.concurrency, args.rounds,
                                     args.top_logprobs))


if __name__ == "__main__":
    sys.exit(main())
