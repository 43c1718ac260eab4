"""`vlmrag serve` as a real process: announces itself in DATA_DIR/server.json, serves, cleans up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.support.vllm_server import REPO_ROOT


def test_serve_announces_serves_and_cleans_up(tmp_path: Path, tiny_clip_config: Path) -> None:
    data = tmp_path / "data"
    env = {**os.environ, "VLMRAG_CLIP_MODEL": str(tiny_clip_config), "VLMRAG_CLIP_PRETRAINED": "none",
           "VLMRAG_CLIP_DEVICE": "cpu", "VLMRAG_AUTH_DISABLED": "true", "VLMRAG_VLLM_URL": "http://127.0.0.1:9"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "--data-dir", str(data), "serve", "--port", "0"],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    run_file = data / "server.json"
    try:
        deadline = time.monotonic() + 90
        while not run_file.exists():
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, "server.json never appeared"
            time.sleep(0.2)
        info = json.loads(run_file.read_text())
        assert info["pid"] == proc.pid and info["url"].startswith("http://127.0.0.1:")
        assert httpx.get(f"{info['url']}/healthz", timeout=5).json() == {"status": "ok"}
        ready = httpx.get(f"{info['url']}/readyz", timeout=10)
        assert ready.status_code == 503 and ready.json()["checks"]["store"] == "ok"  # no vLLM on port 9
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
    # uvicorn re-raises the signal after a graceful shutdown
    assert rc in (0, -signal.SIGTERM) and not run_file.exists()
