"""Load: N concurrent clients for T seconds against vlmrag + the tiny vLLM, text and image questions mixed.

Starts the tiny vLLM CPU server and ``vlmrag serve`` (a separate process, so its RSS is its own) on
loopback, ingests the sample snippets, then for each concurrency level runs closed-loop clients
(each sends its next request when the previous one is answered) for ``--seconds``. Prints, per
level: requests, throughput, p50/p95/p99 latency of all answers, counts by status (``conn`` =
connection error), and vlmrag's RSS before and after (from /proc).

Goal (issue 5): no 5xx other than deliberate 503s (overload / model unavailable), RSS growth < 5 %
over a 5-minute run. Loopback only; clients are capped at 512 and a level at 600 s.

    .venv/bin/python benchmarks/load.py --clients 8 32 128 --seconds 20
    .venv/bin/python benchmarks/load.py --clients 32 --seconds 300          # the 5-minute soak
    .venv/bin/python benchmarks/load.py --url http://127.0.0.1:8080 --pid 1234   # an existing server
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ipaddress
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.fixtures_retriever import make_sample_images
from tests.support.fixtures_server import sample_snippets
from tests.support.media import data_url, png_bytes
from tests.support.tiny_clip import write_tiny_clip_config
from tests.support.vllm_server import free_port, start_tiny_vllm

MAX_CLIENTS = 512
MAX_SECONDS = 600.0
QUESTIONS = ["How long is the bike warranty?", "Which card is yellow?", "Show me the checkerboard.",
             "What do the green stripes mean?"]
DELIBERATE_5XX_CODES = {"overloaded", "model_unavailable", "upstream_unavailable", "store_unavailable"}


@dataclass
class LevelResult:
    clients: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    undeliberate_5xx: list[str] = field(default_factory=list)
    rss_before_mb: float | None = None
    rss_after_mb: float | None = None


def rss_mb(pid: int | None) -> float | None:
    """Resident set size of ``pid`` in MiB, from /proc (None if unknown)."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def request_body(i: int, photo: str, max_tokens: int) -> dict[str, Any]:
    """Every other request carries the photo."""
    question = QUESTIONS[i % len(QUESTIONS)]
    content: Any = question
    if i % 2:
        content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": photo}}]
    return {"model": "vlmrag", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0}


async def run_level(url: str, clients: int, seconds: float, photo: str, max_tokens: int, pid: int | None,
                    headers: dict[str, str]) -> LevelResult:
    result = LevelResult(clients, seconds, rss_before_mb=rss_mb(pid))
    stop_at = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits, headers=headers) as http:

        async def client(n: int) -> None:
            i = n
            while time.monotonic() < stop_at:
                started = time.perf_counter()
                try:
                    response = await http.post("/v1/chat/completions", json=request_body(i, photo, max_tokens))
                    status = str(response.status_code)
                    if response.status_code >= 500:
                        code = _error_code(response)
                        if not (response.status_code == 503 and code in DELIBERATE_5XX_CODES
                                and "retry-after" in response.headers):
                            result.undeliberate_5xx.append(f"{status} {code}: {response.text[:200]}")
                        elif code:
                            status = f"{status}:{code}"
                except httpx.HTTPError as exc:
                    status = f"conn:{type(exc).__name__}"
                result.latencies_ms.append((time.perf_counter() - started) * 1000)
                result.statuses[status] += 1
                i += clients

        await asyncio.gather(*(client(n) for n in range(clients)))
    result.rss_after_mb = rss_mb(pid)
    return result


def _error_code(response: httpx.Response) -> str | None:
    try:
        return response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def _require_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"refusing to load-test {url}: loopback addresses only")


def start_vlmrag(tmp: Path, vllm_url: str, args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str]:
    """``vlmrag serve`` in its own process on a free loopback port; returns it and its URL."""
    port = free_port()
    env = {
        **os.environ,
        "VLMRAG_DATA_DIR": str(tmp / "data"), "VLMRAG_CLIP_MODEL": str(write_tiny_clip_config(tmp / "clip")),
        "VLMRAG_CLIP_PRETRAINED": "none", "VLMRAG_CLIP_DEVICE": "cpu", "VLMRAG_AUTH_DISABLED": "true",
        "VLMRAG_VLLM_URL": vllm_url, "VLMRAG_VLLM_MODEL": "tiny-vlm", "VLMRAG_RERANK_SCORER": args.scorer,
        "VLMRAG_RETRIEVAL_THRESHOLD": "0", "VLMRAG_RETRIEVAL_K": "3", "VLMRAG_RETRIEVAL_POOL": "8",
        # one client address for every simulated user: the per-key limiter would measure itself
        "VLMRAG_RATE_LIMIT_RPS": str(args.rate_limit_rps), "VLMRAG_RATE_LIMIT_BURST": str(int(args.rate_limit_rps) + 1),
        "VLMRAG_MAX_CONCURRENT_MODEL_CALLS": str(args.max_concurrent),
        "VLMRAG_MAX_QUEUED_MODEL_CALLS": str(args.max_queued), "VLMRAG_LOG_LEVEL": "warning",
    }
    log = open(tmp / "vlmrag.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=tmp, env={**env, "PYTHONPATH": str(REPO)}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"vlmrag exited during startup; see {tmp / 'vlmrag.log'}")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"vlmrag not ready in 180 s; see {tmp / 'vlmrag.log'}")


def ingest(url: str, headers: dict[str, str]) -> None:
    with httpx.Client(base_url=url, timeout=120, headers=headers) as http:
        for s in sample_snippets():
            files = {"image": ("x.png", s.image, "image/png")} if s.image else None
            http.post("/v1/snippets", data={"text": s.text, "source": s.source}, files=files).raise_for_status()


def print_table(results: list[LevelResult], max_tokens: int) -> None:
    print(f"\nvlmrag load (closed-loop clients, chat non-streamed, max_tokens={max_tokens}, half with an image)")
    head = (f"{'clients':>7} | {'secs':>4} | {'requests':>8} | {'req/s':>6} | {'p50 ms':>7} | {'p95 ms':>7} | "
            f"{'p99 ms':>7} | {'RSS MiB before->after':>22} | statuses")
    print(head)
    print("-" * len(head))
    for r in results:
        n = len(r.latencies_ms)
        rss = (f"{r.rss_before_mb:.0f}->{r.rss_after_mb:.0f} ({(r.rss_after_mb / r.rss_before_mb - 1) * 100:+.1f}%)"
               if r.rss_before_mb and r.rss_after_mb else "n/a")
        statuses = ", ".join(f"{k}={v}" for k, v in sorted(r.statuses.items()))
        print(f"{r.clients:>7} | {r.seconds:>4.0f} | {n:>8} | {n / r.seconds:>6.1f} | {pct(r.latencies_ms, 50):>7.0f} | "
              f"{pct(r.latencies_ms, 95):>7.0f} | {pct(r.latencies_ms, 99):>7.0f} | {rss:>22} | {statuses}")
    bad = [line for r in results for line in r.undeliberate_5xx]
    print(f"\nundeliberate 5xx: {len(bad)}" + "".join(f"\n  {line}" for line in bad[:10]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--seconds", type=float, default=20.0, help="Per concurrency level.")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--url", help="A running vlmrag on loopback (default: start vLLM and vlmrag here).")
    parser.add_argument("--pid", type=int, help="Its process id, for RSS (with --url).")
    parser.add_argument("--api-key", default=os.environ.get("VLMRAG_API_KEY", ""))
    parser.add_argument("--vllm-url", help="A running tiny vLLM (default: start one).")
    parser.add_argument("--scorer", default="clip", choices=["clip", "vlm"])
    parser.add_argument("--max-concurrent", type=int, default=16, help="VLMRAG_MAX_CONCURRENT_MODEL_CALLS")
    parser.add_argument("--max-queued", type=int, default=64, help="VLMRAG_MAX_QUEUED_MODEL_CALLS")
    parser.add_argument("--rate-limit-rps", type=float, default=1e6)
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args()
    if any(c < 1 or c > MAX_CLIENTS for c in args.clients) or not 0 < args.seconds <= MAX_SECONDS:
        raise SystemExit(f"clients must be 1..{MAX_CLIENTS} and seconds 0..{MAX_SECONDS:.0f}")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    tmp = Path(tempfile.mkdtemp(prefix="vlmrag-load-"))
    vllm = proc = None
    try:
        if args.url:
            _require_loopback(args.url)
            url, pid = args.url.rstrip("/"), args.pid
        else:
            if args.vllm_url:
                _require_loopback(args.vllm_url)
            vllm = None if args.vllm_url else start_tiny_vllm(tmp / "tiny_vlm")
            proc, url = start_vlmrag(tmp, args.vllm_url or vllm.url, args)  # type: ignore[union-attr]
            pid = proc.pid
            ingest(url, headers)
        photo = data_url(png_bytes(make_sample_images(3)[2]))
        asyncio.run(run_level(url, 4, 3.0, photo, args.max_tokens, None, headers))  # warm-up, not reported
        results = [asyncio.run(run_level(url, c, args.seconds, photo, args.max_tokens, pid, headers))
                   for c in args.clients]
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        if vllm is not None:
            vllm.stop()
    print_table(results, args.max_tokens)
    if args.json:
        args.json.write_text(json.dumps([{
            "clients": r.clients, "seconds": r.seconds, "requests": len(r.latencies_ms),
            "p50_ms": pct(r.latencies_ms, 50), "p95_ms": pct(r.latencies_ms, 95), "p99_ms": pct(r.latencies_ms, 99),
            "statuses": dict(r.statuses), "rss_before_mb": r.rss_before_mb, "rss_after_mb": r.rss_after_mb,
            "undeliberate_5xx": len(r.undeliberate_5xx)} for r in results], indent=2))
    return 1 if any(r.undeliberate_5xx for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
