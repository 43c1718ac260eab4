"""What MCP adds to a search: the ``search`` tool over /mcp vs the same search over ``POST /v1/search``.

One process, one run: vlmrag under real uvicorn on loopback (tiny random CLIP, auth on, the scripted vLLM
behind it; scorer ``clip``, so no model call), the sample snippets ingested (4 images, 2 texts). The same
queries go alternately through REST (httpx, keep-alive) and through the official ``mcp`` client (one
initialized session, stateless server, JSON responses). Two servers: one with the default
``VLMRAG_MCP_IMAGES=thumbnail`` (results carry their thumbnails: REST does not) and one with ``none``
(the transport alone). Reported per server: p50/p90 ms of each, and ``added`` = MCP p50 − REST p50
(goal: ≤ 3 ms at p50).

    .venv/bin/python benchmarks/bench_mcp.py [--requests 200] [--k 3]
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

from server.app import create_app
from tests.support.fake_vllm import FakeVLLM
from tests.support.fixtures_mcp import mcp_session
from tests.support.fixtures_server import UvicornThread, sample_snippets
from tests.support.settings import make_settings
from tests.support.tiny_clip import write_tiny_clip_config
from tests.support.vllm_server import free_port

KEY = "bench-key-0123456789abcdef"
QUERIES = ["a warm yellow card", "green stripes on black", "checkerboard", "how long is the warranty",
           "blue and red gradient", "bike purchase date"]


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def start(root: Path, clip_config: Path, images: str) -> tuple[UvicornThread, str]:
    settings = make_settings(root / f"data-{images}", clip_config, auth_disabled=False, api_keys=f"chat+admin:{KEY}",
                             mcp_images=images, log_level="warning")
    server = UvicornThread(create_app(settings, vllm_transport=httpx.MockTransport(FakeVLLM())), free_port())
    server.start()
    url = f"http://127.0.0.1:{server.server.config.port}"
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
        for s in sample_snippets():
            files = {"image": (s.source.rsplit("/", 1)[-1], s.image, "image/png")} if s.image else None
            http.post("/v1/snippets", data={"text": s.text, "source": s.source, "tags": s.tags},
                      files=files).raise_for_status()
    return server, url


async def measure(url: str, requests: int, k: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"rest": [], "mcp": []}
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as rest, \
            mcp_session(f"{url}/mcp", KEY) as session:

        async def via_rest(query: str) -> None:
            response = await rest.post("/v1/search", json={"text": query, "k": k})
            response.raise_for_status()

        async def via_mcp(query: str) -> None:
            result = await session.call_tool("search", {"query": query, "k": k})
            if result.is_error:
                raise RuntimeError(str(result.content))

        calls: dict[str, Any] = {"rest": via_rest, "mcp": via_mcp}
        for i in range(20):  # warm-up: CLIP, caches, connections
            for call in calls.values():
                await call(QUERIES[i % len(QUERIES)])
        for i in range(requests):
            order = ("rest", "mcp") if i % 2 == 0 else ("mcp", "rest")  # alternate: neither always goes second
            for name in order:
                t = time.perf_counter()
                await calls[name](QUERIES[i % len(QUERIES)])
                times[name].append((time.perf_counter() - t) * 1000)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="Searches per path and server (default 200).")
    parser.add_argument("--k", type=int, default=3, help="Results per search (default 3).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        clip_config = write_tiny_clip_config(root / "clip")
        print(f"{'server (mcp_images)':<22}{'REST p50':>10}{'p90':>8}{'MCP p50':>10}{'p90':>8}{'added p50':>11}")
        worst = 0.0
        for images in ("thumbnail", "none"):
            server, url = start(root, clip_config, images)
            try:
                times = asyncio.run(measure(url, args.requests, args.k))
            finally:
                server.stop()
            rest50, mcp50 = statistics.median(times["rest"]), statistics.median(times["mcp"])
            worst = max(worst, mcp50 - rest50)
            print(f"{images:<22}{rest50:>10.2f}{pct(times['rest'], 90):>8.2f}{mcp50:>10.2f}{pct(times['mcp'], 90):>8.2f}"
                  f"{mcp50 - rest50:>+11.2f}")
        print(f"goal: MCP adds <= 3 ms at p50: {'met' if worst <= 3.0 else 'NOT met'} (worst {worst:+.2f} ms; "
              f"{args.requests} searches per path, k={args.k})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
