"""The real tiny vLLM server, started once per test session (``vllm_server``).

Skips with a clear reason when the vLLM venv is missing on a developer machine; in CI (env ``CI``
set) a missing venv or a failed start is an error, never a silent skip.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.vllm_server import DEFAULT_VENV_PYTHON, VLLMServer, VLLMServerError, build_tiny_vlm_dir

TINY_VLM_NAME = "tiny-vlm"
# Callers' tools need vLLM's tool-call parser; hermes fits the Qwen2-VL family (and the deploy files).
TOOL_ARGS = ("--enable-auto-tool-choice", "--tool-call-parser", "hermes")


def vllm_python() -> Path:
    """The vLLM venv's interpreter ($VLLM_PYTHON overrides)."""
    return Path(os.environ.get("VLLM_PYTHON") or DEFAULT_VENV_PYTHON)


def _missing(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: e2e tests must run; `make vllm-venv` builds it)", pytrace=False)
    pytest.skip(f"{reason}; run deploy/vllm/setup_cpu_venv.sh (or `make vllm-venv`) to enable e2e tests")


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weights Qwen2-VL folder, built with the vLLM venv (it has ``tokenizers``)."""
    python = vllm_python()
    if not python.exists():
        _missing(f"vLLM venv not found at {python}")
    try:
        return build_tiny_vlm_dir(tmp_path_factory.mktemp("tiny_vlm"), python)
    except VLLMServerError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def tiny_ranker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as a one-label cross-encoder (``JinaVLForRanking``), for ``--runner pooling``."""
    python = vllm_python()
    if not python.exists():
        _missing(f"vLLM venv not found at {python}")
    try:
        return build_tiny_vlm_dir(tmp_path_factory.mktemp("tiny_ranker"), python, ranker=True)
    except VLLMServerError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def vllm_server(tiny_vlm_dir: Path) -> Iterator[VLLMServer]:
    """A running vLLM CPU server with the tiny VLM (``served_model_name`` = ``tiny-vlm``)."""
    # The tiny BPE spends about one token per character: 4096 (the model's max positions) leaves room
    # for the system prompt plus a few snippets; later flags win over DEFAULT_ARGS' 1024.
    server = VLLMServer(tiny_vlm_dir, served_model_name=TINY_VLM_NAME, venv_python=vllm_python(),
                        extra_args=("--max-model-len", "4096", *TOOL_ARGS))
    try:
        server.start()
    except Exception as exc:  # noqa: BLE001 - any start failure fails the tier; the log tail is in the message
        pytest.fail(f"vLLM did not start: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()
