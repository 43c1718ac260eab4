"""Interleaved A/B of ``/v1/search``: two servers in one process, each request sent to both in turn.

On a small shared box the time of one run drifts by more than a change is worth (``bench_search_scale``'s
``search − encode`` swung ±2 ms between runs of the same code). Here both arms serve the same data (two
data dirs filled from one seed through ``bench_search_scale.fill``) under uvicorn on loopback, and every
question goes to both, in alternating order, so drift hits both alike. Printed per arm and mode: the
client's p50 and the server's ``embed`` and ``total`` p50.

An arm is ``NAME`` or ``NAME:key=value,...``: ``Settings`` fields (``retrieval_pool=40``,
``retrieval_fusion=rrf``) plus ``uvicorn_http`` (``h11`` / ``httptools``) and ``uvicorn_loop``
(``asyncio`` / ``uvloop``); an arm with no overrides is the default configuration. Like
bench_search_scale: ViT-B-32 with random weights (a real encode cost), ONNX, query cache off, scorer clip.
The httptools / uvloop arms need `pip install httptools uvloop` (not project dependencies).

    .venv/bin/python benchmarks/bench_search_ab.py --arm h11:uvicorn_http=h11,uvicorn_loop=asyncio \\
        --arm standard:uvicorn_http=httptools,uvicorn_loop=uvloop [--points 10000] [--queries 200]
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
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_search_scale import SERVER_SETTINGS, fill, questions
from server.app import create_app
from server.wiring import build_embedder
from tests.support.fixtures_server import UvicornThread, make_settings
from tests.support.vllm_server import free_port

UVICORN_KEYS = {"uvicorn_http": "http", "uvicorn_loop": "loop"}


def parse_arm(spec: str) -> tuple[str, dict[str, Any], dict[str, str]]:
    """``NAME:key=value,...`` -> (name, Settings overrides, uvicorn.Config overrides)."""
    name, _, rest = spec.partition(":")
    settings: dict[str, Any] = {}
    server: dict[str, str] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key in UVICORN_KEYS:
            server[UVICORN_KEYS[key]] = value
        else:
            settings[key] = value
    return name, settings, server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", action="append", required=True, help="NAME[:key=value,...]; give two or more")
    parser.add_argument("--points", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--modes", default="hybrid,dense")
    args = parser.parse_args()
    arms = [parse_arm(spec) for spec in args.arm]
    if len(arms) < 2:
        parser.error("give at least two --arm")
    tmp = Path(tempfile.mkdtemp(prefix="bench-search-ab-"))
    (tmp / "onnx").mkdir()  # one ONNX export shared by every arm

    def settings_for(name: str, overrides: dict[str, Any]):
        (data := tmp / f"data-{name}").mkdir()
        (data / "onnx").symlink_to(tmp / "onnx")
        return make_settings(data, Path("ViT-B-32"), clip_model="ViT-B-32", clip_backend="onnx",
                             **{**SERVER_SETTINGS, **overrides})

    embedder = build_embedder(settings_for("fill", {}))
    servers: dict[str, UvicornThread] = {}
    for name, overrides, server_overrides in arms:
        settings = settings_for(name, overrides)
        asyncio.run(fill(settings, embedder, args.points, np.random.default_rng(1)))  # the same points per arm
        servers[name] = UvicornThread(create_app(settings), free_port(), **server_overrides)
    queries = questions(args.queries, np.random.default_rng(0))
    for server in servers.values():
        server.start()
    clients = {name: httpx.Client(base_url=f"http://127.0.0.1:{server.server.config.port}", timeout=60)
               for name, server in servers.items()}
    print(f"/v1/search A/B, interleaved: {args.points} points, {args.queries} questions (+5 warm-up), arms "
          + "; ".join(args.arm))
    try:
        for mode in args.modes.split(","):
            times = {name: {"client": [], "embed": [], "total": []} for name in servers}
            for i, question in enumerate([*queries[:5], *queries]):
                order = list(servers) if i % 2 else list(servers)[::-1]
                for name in order:
                    started = time.perf_counter()
                    r = clients[name].post("/v1/search", json={"text": question, "scorer": "clip", "mode": mode})
                    elapsed = (time.perf_counter() - started) * 1000
                    r.raise_for_status()
                    if i >= 5:
                        timings = r.json()["timings"]
                        for key, value in (("client", elapsed), ("embed", timings.get("embed", 0.0)),
                                           ("total", timings["total"])):
                            times[name][key].append(value)
            for name, columns in times.items():
                cells = "  ".join(f"{key} p50 {statistics.median(v):6.2f}" for key, v in columns.items())
                print(f"{mode:>7} {name:>12}  {cells}  (ms)")
    finally:
        for client in clients.values():
            client.close()
        for server in servers.values():
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
