"""What vlmrag adds on top of the model: chat latency vs vLLM called directly, and /v1/search vs CLIP encode.

Runs vlmrag under real uvicorn on loopback with the tiny random CLIP, in front of the tiny vLLM CPU
server (started here unless ``--vllm-url`` names a running one). For every question the *same final
prompt* vlmrag sent to vLLM (recorded) is then sent to vLLM directly, at 1 and 8 concurrent clients.

Reported per concurrency, p50/p95 in ms:
* ``vlmrag``: client-side latency of POST /v1/chat/completions (non-streamed, scorer ``clip``);
* ``vllm direct``: the same final body POSTed to vLLM's /v1/chat/completions;
* ``added``: vlmrag − its own ``generate`` time (everything but the model: parsing, decode, embed,
  search, prompt build, relay); ``added − embed − search``: the service's own overhead
  (goal ≤ 5 ms p50).
And ``/v1/search`` p50 against the CLIP text encode p50 of the same queries, measured in this process
(goal: search ≤ encode + 10 ms).

    .venv/bin/python benchmarks/bench_service.py [--requests 40] [--vllm-url http://127.0.0.1:8000 --vllm-model NAME]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from retriever.embedder import load_embedder
from server.app import create_app
from server.vllm_client import VLLMClient
from tests.support.fixtures_retriever import make_sample_images
from tests.support.fixtures_server import UvicornThread, make_settings, sample_snippets
from tests.support.media import data_url, png_bytes
from tests.support.tiny_clip import write_tiny_clip_config
from tests.support.vllm_server import free_port, start_tiny_vllm

QUESTIONS = ["How long is the bike warranty?", "Which card is yellow?", "Show me the checkerboard.",
             "What do the green stripes mean?"]
MAX_TOKENS = 8


class RecordingClient(VLLMClient):
    """The real client, remembering the final body of each answer (keyed by the question)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bodies: dict[str, dict[str, Any]] = {}

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        if not body.get("logprobs"):
            self.bodies[_question_key(body)] = body
        return await super().complete(body)


def _question_key(body: dict[str, Any]) -> str:
    parts = body["messages"][-1]["content"]
    texts = [p["text"] for p in parts if p["type"] == "text"] if isinstance(parts, list) else [parts]
    return texts[-1].rsplit("Question:", 1)[-1].strip()  # every question text is asked one way only


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def user_message(question: str, image: str | None) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": question}]
    if image:
        content.append({"type": "image_url", "image_url": {"url": image}})
    return {"role": "user", "content": content}


async def run_clients(concurrency: int, total: int, one: Any) -> list[Any]:
    """``total`` calls of ``one(i)`` by ``concurrency`` workers; returns the results in call order."""
    results: list[Any] = [None] * total
    counter = iter(range(total))

    async def worker() -> None:
        for i in counter:
            results[i] = await one(i)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


async def bench_chat(url: str, vllm_url: str, recorder: RecordingClient, requests: int,
                     concurrency: int, photo: str) -> dict[str, list[float]]:
    cases = [(q, photo if i % 2 else None) for i, q in enumerate(QUESTIONS)]
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        async def via_vlmrag(i: int) -> dict[str, float]:
            question, image = cases[i % len(cases)]
            body = {"model": "vlmrag", "messages": [user_message(question, image)], "max_tokens": MAX_TOKENS,
                    "temperature": 0, "retrieval": {"scorer": "clip", "k": 2}}
            t = time.perf_counter()
            r = await http.post(f"{url}/v1/chat/completions", json=body)
            elapsed = (time.perf_counter() - t) * 1000
            r.raise_for_status()
            timings = r.json()["timings"]
            return {"total": elapsed, "generate": timings["generate"], "embed": timings.get("embed", 0.0),
                    "search": timings.get("search", 0.0), "prompt": timings.get("prompt", 0.0)}

        await run_clients(concurrency, len(cases) * 2, via_vlmrag)  # warm-up; records the final bodies
        svc = await run_clients(concurrency, requests, via_vlmrag)
        bodies = [recorder.bodies[q] for q, _ in cases]

        async def direct(i: int) -> float:
            t = time.perf_counter()
            r = await http.post(f"{vllm_url}/v1/chat/completions", json=dict(bodies[i % len(bodies)], stream=False))
            elapsed = (time.perf_counter() - t) * 1000
            r.raise_for_status()
            return elapsed

        await run_clients(concurrency, len(cases), direct)
        vllm = await run_clients(concurrency, requests, direct)
    return {
        "vlmrag": [s["total"] for s in svc], "direct": vllm,
        "added": [s["total"] - s["generate"] for s in svc],
        "own": [s["total"] - s["generate"] - s["embed"] - s["search"] for s in svc],
        "embed_search": [s["embed"] + s["search"] for s in svc],
        "prompt": [s["prompt"] for s in svc],
    }


async def bench_search(url: str, clip_config: Path, requests: int) -> tuple[list[float], list[float]]:
    embedder = load_embedder(str(clip_config), "none", device="cpu")
    queries = [QUESTIONS[i % len(QUESTIONS)] for i in range(requests)]
    encode = []
    for q in queries:
        t = time.perf_counter()
        embedder.embed_texts([q])
        encode.append((time.perf_counter() - t) * 1000)
    search = []
    async with httpx.AsyncClient(timeout=60) as http:
        for q in queries[:5]:
            await http.post(f"{url}/v1/search", json={"text": q, "reranker": "clip"})
        for q in queries:
            t = time.perf_counter()
            r = await http.post(f"{url}/v1/search", json={"text": q, "reranker": "clip"})
            search.append((time.perf_counter() - t) * 1000)
            r.raise_for_status()
    return search, encode


def ingest(url: str) -> None:
    with httpx.Client(base_url=url, timeout=60) as http:
        for s in sample_snippets():
            files = {"image": ("x.png", s.image, "image/png")} if s.image else None
            http.post("/v1/snippets", data={"text": s.text, "source": s.source}, files=files).raise_for_status()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=40, help="Measured requests per concurrency level.")
    parser.add_argument("--vllm-url", help="A running vLLM (default: start the tiny one).")
    parser.add_argument("--vllm-model", default="tiny-vlm")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-service-"))
    clip_config = write_tiny_clip_config(tmp)
    vllm = None if args.vllm_url else start_tiny_vllm(tmp / "tiny_vlm")
    vllm_url = args.vllm_url or vllm.url  # type: ignore[union-attr]
    settings = make_settings(tmp / "data", clip_config, vllm_url=[vllm_url], vllm_model=args.vllm_model,
                             vllm_deadline_s=300.0, max_concurrent_model_calls=64,
                             rate_limit_rps=1e6, rate_limit_burst=1_000_000)  # measure latency, not the limiter
    recorder = RecordingClient([vllm_url], args.vllm_model, deadline_s=300.0)
    server = UvicornThread(create_app(settings, answer_client=recorder), free_port())
    server.start()
    url = f"http://127.0.0.1:{server.server.config.port}"
    photo = data_url(png_bytes(make_sample_images(3)[2]))
    try:
        ingest(url)
        rows = []
        for concurrency in (1, 8):
            r = asyncio.run(bench_chat(url, vllm_url, recorder, args.requests, concurrency, photo))
            rows.append((concurrency, r))
        search, encode = asyncio.run(bench_search(url, clip_config, args.requests))
    finally:
        server.stop()
        if vllm is not None:
            vllm.stop()

    print(f"\nvlmrag chat vs vLLM direct (same final prompt, max_tokens={MAX_TOKENS}, {args.requests} requests; ms)")
    head = f"{'clients':>7} | {'vlmrag p50/p95':>15} | {'vLLM direct p50/p95':>19} | {'added p50/p95':>14} | " \
           f"{'embed+search p50':>16} | {'prompt p50':>10} | {'own overhead p50/p95':>20}"
    print(head)
    print("-" * len(head))
    for concurrency, r in rows:
        def pp(name: str, r: dict[str, list[float]] = r) -> str:
            return f"{pct(r[name], 50):.1f}/{pct(r[name], 95):.1f}"
        print(f"{concurrency:>7} | {pp('vlmrag'):>15} | {pp('direct'):>19} | {pp('added'):>14} | "
              f"{pct(r['embed_search'], 50):>16.1f} | {pct(r['prompt'], 50):>10.1f} | {pp('own'):>20}")
    s50, e50 = statistics.median(search), statistics.median(encode)
    print(f"\n/v1/search p50 {s50:.1f} ms (p95 {pct(search, 95):.1f}) vs CLIP text encode p50 {e50:.1f} ms "
          f"-> search - encode = {s50 - e50:.1f} ms (goal <= 10 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
