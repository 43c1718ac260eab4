"""Launch a real vLLM OpenAI-compatible server (CPU build) for tests.

Runs inside the APP venv (pytest) and starts vLLM from the separate vLLM venv
(``deploy/vllm/setup_cpu_venv.sh`` creates it at ``<repo>/.venv-vllm``)::

    from tests.support.tiny_vlm import build_tiny_vlm   # or: .venv-vllm/bin/python tests/support/tiny_vlm.py DIR
    from tests.support.vllm_server import VLLMServer

    with VLLMServer(model_dir) as srv:
        httpx.get(f"{srv.base_url}/models")             # http://127.0.0.1:PORT/v1/models

Modelled on vLLM's ``tests/utils.py::RemoteOpenAIServer``. Only stdlib + httpx.
The server runs in its own process group so stop()/kill()/pause()/resume()
reach the engine-core child processes too.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Self

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_VENV_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"

# Arguments that make the tiny random-weights model run on a small CPU box.
DEFAULT_ARGS: tuple[str, ...] = (
    "--load-format", "dummy",
    "--dtype", "float32",
    "--max-model-len", "4096",
    "--enforce-eager",
    "--max-num-seqs", "4",
    "--limit-mm-per-prompt", '{"image": 4}',
    "--seed", "0",
)

# The tiny ranker (``build_tiny_vlm_dir(..., ranker=True)``) is served by the pooling runner: /rerank, /score.
RANKER_ARGS: tuple[str, ...] = ("--runner", "pooling")

DEFAULT_ENV: dict[str, str] = {
    "TORCHDYNAMO_DISABLE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "PYTHONUNBUFFERED": "1",
}


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on ``host`` (there is a small race, as always)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class VLLMServerError(RuntimeError):
    pass


class VLLMServer:
    """A vLLM OpenAI-compatible server subprocess.

    Args:
        model_dir: model folder (e.g. from ``build_tiny_vlm``) or a model id.
        port: TCP port on 127.0.0.1; a free one is picked when None.
        served_model_name: the ``model`` name clients send (default "tiny-vlm").
        venv_python: interpreter of the vLLM venv (default <repo>/.venv-vllm/bin/python,
            or $VLLM_PYTHON if set).
        extra_args: appended after the defaults (later flags win in argparse).
        default_args: replace DEFAULT_ARGS entirely (e.g. for a GPU model).
        env: extra environment variables, on top of os.environ and DEFAULT_ENV.
        log_path: where stdout+stderr go (default: a temp file; see ``.log_path``).
        startup_timeout: seconds to wait for GET /health (default 180).
        host: bind address (default 127.0.0.1).
        start: start in __init__ (default False: started by __enter__ or start()).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        port: int | None = None,
        served_model_name: str = "tiny-vlm",
        venv_python: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
        default_args: Sequence[str] | None = None,
        env: dict[str, str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        startup_timeout: float = 180.0,
        host: str = "127.0.0.1",
        start: bool = False,
    ) -> None:
        self.model_dir = str(model_dir)
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.served_model_name = served_model_name
        self.venv_python = Path(venv_python or os.environ.get("VLLM_PYTHON") or DEFAULT_VENV_PYTHON)
        self.extra_args = list(extra_args)
        self.default_args = list(DEFAULT_ARGS if default_args is None else default_args)
        self.env_overrides = dict(env or {})
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="vllm-server-", suffix=".log")
            os.close(fd)
            log_path = name
        self.log_path = Path(log_path)
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None
        self._log_file: IO[bytes] | None = None
        if start:
            self.start()

    # ------------------------------------------------------------------ props
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def command(self) -> list[str]:
        return [
            str(self.venv_python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model_dir,
            "--served-model-name", self.served_model_name,
            "--host", self.host,
            "--port", str(self.port),
            *self.default_args,
            *self.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # The app venv's settings must not leak into the vLLM interpreter.
        for k in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
            env.pop(k, None)
        env.update(DEFAULT_ENV)
        env.update(self.env_overrides)
        return env

    # -------------------------------------------------------------- lifecycle
    def start(self, wait: bool = True) -> Self:
        if self.proc is not None and self.proc.poll() is None:
            raise VLLMServerError("server already running")
        if not self.venv_python.exists():
            raise VLLMServerError(
                f"vLLM venv python not found: {self.venv_python} "
                "(run deploy/vllm/setup_cpu_venv.sh from the repo root)"
            )
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()/kill()
        self._log_file.write(f"\n=== {time.strftime('%H:%M:%S')} $ {' '.join(self.command())}\n".encode())
        self._log_file.flush()
        self._t_start = time.monotonic()
        self.proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=self.environment(),
            cwd=str(REPO_ROOT),
            start_new_session=True,  # own session + process group
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float | None = None) -> None:
        """Poll GET /health until 200; raise with the log tail if the process dies."""
        timeout = self.startup_timeout if timeout is None else timeout
        assert self.proc is not None, "not started"
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=5.0) as client:
            while True:
                rc = self.proc.poll()
                if rc is not None:
                    raise VLLMServerError(
                        f"vLLM server exited with code {rc} during startup; log {self.log_path}:\n"
                        + self.log_tail()
                    )
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        self.startup_seconds = time.monotonic() - self._t_start
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise VLLMServerError(
                        f"vLLM server not healthy after {timeout:.0f}s; log {self.log_path}:\n"
                        + self.log_tail()
                    )
                time.sleep(0.5)

    def is_healthy(self, timeout: float = 2.0) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=timeout).status_code == 200
        except httpx.HTTPError:
            return False

    def _signal_group(self, sig: int) -> bool:
        if self.proc is None:
            return False
        try:
            os.killpg(self.proc.pid, sig)  # pgid == pid (start_new_session)
            return True
        except ProcessLookupError:
            return False

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the process group, SIGKILL after ``timeout`` s. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self._signal_group(signal.SIGCONT)  # a paused server cannot handle SIGTERM
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait(10)
        # reap stragglers (engine core / workers) left in the group
        self._signal_group(signal.SIGKILL)
        self._wait_group_gone()
        self._close_log()
        return self.proc.returncode

    def kill_now(self) -> bool:
        """SIGKILL the process group and return at once (``kill`` reaps it); False if none runs."""
        return self.proc is not None and self._signal_group(signal.SIGKILL)

    def kill(self) -> int | None:
        """SIGKILL the whole process group immediately (simulates a crash)."""
        if self.proc is None:
            return None
        self._signal_group(signal.SIGKILL)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self._wait_group_gone()
        self._close_log()
        return self.proc.returncode

    def _wait_group_gone(self, timeout: float = 5.0) -> None:
        """Wait until no process of the group is left (engine core, workers)."""
        if self.proc is None:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)

    def pause(self) -> None:
        """SIGSTOP the process group: the port stays open but nothing answers."""
        self._signal_group(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_group(signal.SIGCONT)

    def restart(self, wait: bool = True) -> Self:
        """Stop (if running) and start again on the same port."""
        self.stop()
        return self.start(wait=wait)

    def _close_log(self) -> None:
        if self._log_file is not None:
            try:
                self._log_file.close()
            finally:
                self._log_file = None

    def log_tail(self, n_bytes: int = 8000) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return "<no log>"
        return data[-n_bytes:].decode("utf-8", "replace")

    # ------------------------------------------------------- context manager
    def __enter__(self) -> Self:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __del__(self) -> None:  # best effort: never leave a server behind
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.kill()
        except Exception:  # noqa: BLE001, S110 - interpreter shutdown, nothing to report to
            pass

    def __repr__(self) -> str:
        state = "not started" if self.proc is None else (
            "running" if self.proc.poll() is None else f"exited {self.proc.returncode}"
        )
        return f"<VLLMServer {self.url} model={self.served_model_name!r} {state}>"


if __name__ == "__main__":  # manual smoke: python tests/support/vllm_server.py MODEL_DIR
    with VLLMServer(sys.argv[1]) as srv:
        print(f"healthy at {srv.base_url} after {srv.startup_seconds:.1f}s; log {srv.log_path}")
        print(httpx.get(f"{srv.base_url}/models").json())


def build_tiny_vlm_dir(dest: Path, python: Path | None = None, *, ranker: bool = False) -> Path:
    """Build the tiny random-weights VLM folder with the vLLM venv's python (it has ``tokenizers``).

    ``ranker``: the same model as a one-label cross-encoder (``JinaVLForRanking``; serve it with
    ``RANKER_ARGS``). Raises VLLMServerError with the builder's output when it fails.
    """
    python = Path(python or os.environ.get("VLLM_PYTHON") or DEFAULT_VENV_PYTHON)
    done = subprocess.run(
        [str(python), str(REPO_ROOT / "tests" / "support" / "tiny_vlm.py"), *(["--ranker"] if ranker else []),
         str(dest)],
        capture_output=True, text=True, timeout=120, cwd=str(REPO_ROOT), check=False,
    )
    if done.returncode != 0:
        raise VLLMServerError(f"building the tiny VLM with {python} failed:\n{done.stdout}\n{done.stderr}")
    return dest


def start_tiny_vllm(dest: Path, extra_args: Sequence[str] = ("--max-model-len", "4096"), **kwargs: object) -> VLLMServer:
    """Build the tiny VLM into ``dest`` and start a VLLMServer on it (benchmarks; caller stops it)."""
    server = VLLMServer(build_tiny_vlm_dir(dest), extra_args=extra_args, **kwargs)  # type: ignore[arg-type]
    server.start()
    print(f"tiny vLLM up in {server.startup_seconds:.0f}s at {server.url}", file=sys.stderr)
    return server
