"""`vlmrag serve` as a real process: announces itself in DATA_DIR/server.json, serves, cleans up; startup
failures are one line before uvicorn starts; `make run` (deploy/run.sh) creates a key on a fresh machine."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from retriever.store.edge import EdgeStore
from server.auth import hash_key
from server.cli import main
from tests.support.vllm_server import REPO_ROOT

SERVE = [sys.executable, "-m", "server.cli"]


def serve_env(clip_config: Path, **values: str) -> dict[str, str]:
    """This process's environment without any VLMRAG_* of its own, plus tiny CLIP, no vLLM, and ``values``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLMRAG_")}
    env.update({"VLMRAG_CLIP_MODEL": str(clip_config), "VLMRAG_CLIP_PRETRAINED": "none", "VLMRAG_CLIP_DEVICE": "cpu",
                "VLMRAG_VLLM_URL": "http://127.0.0.1:9", "VLMRAG_TEXT_EMBEDDER": "none"})
    env.update(values)
    return env


def use_env(monkeypatch: pytest.MonkeyPatch, cwd: Path, env: dict[str, str]) -> None:
    """Run ``main()`` in-process under ``env``, from ``cwd`` (so no stray .env is read)."""
    monkeypatch.chdir(cwd)
    for name in [k for k in os.environ if k.startswith("VLMRAG_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("VLMRAG_"):
            monkeypatch.setenv(name, value)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.subprocess
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


def _children(pid: int) -> list[str]:
    """Command lines of ``pid``'s child processes (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return found


@pytest.mark.subprocess
def test_serve_workers_runs_n_processes_on_one_port_and_stops_them(tmp_path: Path, tiny_clip_config: Path) -> None:
    data = tmp_path / "data"
    env = serve_env(tiny_clip_config, VLMRAG_AUTH_DISABLED="true", VLMRAG_CLIP_BACKEND="torch",
                    VLMRAG_QDRANT_URL=":memory:")  # each worker its own empty store: enough to see them serve
    proc = subprocess.Popen([*SERVE, "--data-dir", str(data), "serve", "--port", "0", "--workers", "2"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    run_file = data / "server.json"
    try:
        deadline = time.monotonic() + 120
        while not run_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "server.json never appeared"
            time.sleep(0.2)
        info = json.loads(run_file.read_text())
        assert info["pid"] == proc.pid and info["workers"] == 2
        while True:  # the socket is bound before the workers have loaded CLIP
            try:
                assert httpx.get(f"{info['url']}/healthz", timeout=5).json() == {"status": "ok"}
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "no worker answered"
                time.sleep(0.3)
        workers = [c for c in _children(proc.pid) if "spawn_main" in c]
        assert len(workers) == 2, _children(proc.pid)
        for _ in range(6):  # connections land on either worker; each answers the API
            assert httpx.post(f"{info['url']}/v1/search", json={"text": "x", "scorer": "none"},
                              timeout=10).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    assert rc == 0 and not run_file.exists() and not [c for c in _children(proc.pid) if "spawn_main" in c]


def test_serve_workers_needs_a_qdrant_server(
    tmp_path: Path, tiny_clip_config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    use_env(monkeypatch, tmp_path, serve_env(tiny_clip_config, VLMRAG_AUTH_DISABLED="true"))
    assert main(["--data-dir", str(tmp_path / "data"), "serve", "--port", "0", "--workers", "2"]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert "--workers 2 needs a Qdrant server" in line and "embedded store belongs to one process" in line


def test_worker_settings_divide_the_per_process_bounds() -> None:
    from server.commands.serve import worker_settings
    from tests.support.settings import bare_settings

    settings = bare_settings(rate_limit_rps=10.0, rate_limit_burst=20, rate_limit_kb_rps=200.0,
                             rate_limit_kb_burst=401, max_concurrent_model_calls=16, max_queued_model_calls=0,
                             clip_threads=0, workers=4)
    share = worker_settings(settings, 4)
    assert (share.rate_limit_rps, share.rate_limit_burst) == (2.5, 5)
    assert (share.rate_limit_kb_rps, share.rate_limit_kb_burst) == (50.0, 101)  # rounded up: never below the total
    assert (share.max_concurrent_model_calls, share.max_queued_model_calls) == (4, 0)
    assert share.clip_threads == max(1, (os.cpu_count() or 1) // 4) and share.workers == 1
    assert worker_settings(settings.model_copy(update={"clip_threads": 3}), 4).clip_threads == 3  # set: kept


# --- startup failures: one line, before uvicorn starts ------------------------------------------
@pytest.mark.subprocess
def test_serve_without_api_keys_fails_fast_in_one_line(tmp_path: Path, tiny_clip_config: Path) -> None:
    env = serve_env(tiny_clip_config, VLMRAG_AUTH_DISABLED="false")
    proc = subprocess.run([*SERVE, "--data-dir", str(tmp_path / "data"), "serve", "--port", "0"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    [line] = error_lines(proc.stderr)
    assert "no API keys configured" in line and "VLMRAG_API_KEYS" in line
    # refused by the preflight: neither uvicorn nor the CLIP model was started
    assert "Started server process" not in proc.stderr and "loaded CLIP embedder" not in proc.stderr


HOLD_STORE = """
import asyncio, sys
from pathlib import Path
from retriever.store.edge import EdgeStore

async def hold() -> None:
    store = EdgeStore(Path(sys.argv[1]), sys.argv[2])
    await store.ensure_collection(8, "held-by-another-process")
    print("held", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    await store.close()

asyncio.run(hold())
"""


@pytest.mark.subprocess
def test_serve_refuses_a_store_held_by_another_process(
    tmp_path: Path, tiny_clip_config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_STORE, str(data / "qdrant"), "vlmrag"], cwd=REPO_ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        use_env(monkeypatch, tmp_path, serve_env(tiny_clip_config, VLMRAG_AUTH_DISABLED="true"))
        # in-process: a missed lock would start uvicorn here and fail in its lifespan instead
        assert main(["--data-dir", str(data), "serve", "--port", "0"]) == 1
        [line] = error_lines(capsys.readouterr().err)
        assert "embedded store" in line and "is locked" in line
    finally:
        holder.communicate("\n", timeout=30)


def test_serve_reports_missing_weights_and_bad_settings_in_one_line(
    tmp_path: Path, tiny_clip_config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--data-dir", str(tmp_path / "data"), "serve", "--port", "0"]
    missing = tmp_path / "missing.safetensors"
    use_env(monkeypatch, tmp_path, serve_env(tiny_clip_config, VLMRAG_AUTH_DISABLED="true",
                                             VLMRAG_CLIP_PRETRAINED=str(missing)))
    assert main(args) == 1
    [line] = error_lines(capsys.readouterr().err)
    assert str(missing) in line and "does not exist" in line

    monkeypatch.setenv("VLMRAG_CLIP_PRETRAINED", "none")
    monkeypatch.setenv("VLMRAG_PORT", "eighty")
    monkeypatch.setenv("VLMRAG_RETRIEVAL_K", "0")
    assert main(args) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert line.startswith("error: invalid settings:") and "VLMRAG_PORT" in line and "VLMRAG_RETRIEVAL_K" in line
    assert "eighty" not in line  # values are not echoed (they may be secrets)


@pytest.mark.subprocess
def test_lifespan_failure_is_one_line_without_traceback(tmp_path: Path, tiny_clip_config: Path) -> None:
    """A failure only the lifespan sees (the collection was built with another embedder)."""
    data = tmp_path / "data"

    async def build_with_other_embedder() -> None:
        store = EdgeStore(data / "qdrant", "vlmrag")
        await store.ensure_collection(8, "open_clip:some-other-model:none:8")
        await store.close()

    asyncio.run(build_with_other_embedder())
    env = serve_env(tiny_clip_config, VLMRAG_AUTH_DISABLED="true")
    proc = subprocess.run([*SERVE, "--data-dir", str(data), "serve", "--port", "0"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    output = proc.stderr + proc.stdout
    assert proc.returncode == 1, output  # Conflict -> 1, not uvicorn's 3
    assert "Traceback" not in output and "startup failed" in output
    [line] = [line for line in output.splitlines() if "startup failed:" in line]
    assert "some-other-model" in line
    # ours, then uvicorn's "Application startup failed. Exiting." and nothing else at ERROR
    assert len([line for line in output.splitlines() if "ERROR" in line]) == 2, output


# --- make run: a fresh machine gets an admin key in .env -----------------------------------------
@pytest.mark.subprocess
def test_make_run_creates_an_admin_key_and_serves_with_auth_on(tmp_path: Path, tiny_clip_config: Path) -> None:
    data = tmp_path / "data"
    env = serve_env(tiny_clip_config, VLMRAG_DATA_DIR=str(data))
    env["VLMRAG"] = str(Path(sys.executable).parent / "vlmrag")
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(["bash", str(REPO_ROOT / "deploy" / "run.sh"), "--port", "0"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=log, text=True)
    run_file = data / "server.json"
    try:
        assert proc.stdout is not None
        key = next((line.split()[-1] for line in proc.stdout if "shown only this once" in line), None)
        assert key and key.startswith("vlmrag-"), (tmp_path / "serve.log").read_text()
        dotenv = (tmp_path / ".env").read_text()
        assert f"VLMRAG_API_KEYS=admin:sha256:{hash_key(key)}" in dotenv and key not in dotenv
        assert (tmp_path / ".env").stat().st_mode & 0o777 == 0o600
        deadline = time.monotonic() + 90
        while not run_file.exists():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "server.json never appeared"
            time.sleep(0.2)
        url = json.loads(run_file.read_text())["url"]
        assert httpx.get(f"{url}/v1/stats", timeout=10).status_code == 401
        assert httpx.get(f"{url}/v1/stats", headers={"Authorization": f"Bearer {key}"}, timeout=10).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()


def test_keygen_env_file_refuses_to_replace_configured_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    use_env(monkeypatch, tmp_path, {})
    dotenv = tmp_path / ".env"
    dotenv.write_text("VLMRAG_LOG_LEVEL=debug")  # no trailing newline: the entry still gets its own line
    assert main(["keygen", "--scope", "chat", "--env-file", str(dotenv), "--quiet"]) == 0
    key = capsys.readouterr().out.strip()
    lines = dotenv.read_text().splitlines()
    assert lines[0] == "VLMRAG_LOG_LEVEL=debug" and lines[-1] == f"VLMRAG_API_KEYS=chat:sha256:{hash_key(key)}"
    before = dotenv.read_text()
    assert main(["keygen", "--env-file", str(dotenv)]) == 2  # a second line would silently replace the first
    [line] = error_lines(capsys.readouterr().err)
    assert "already sets VLMRAG_API_KEYS" in line and dotenv.read_text() == before
