"""Settings for tests, built in one place: code defaults plus overrides, never a stray .env file.

``bare_settings(**overrides)`` is the one builder; ``make_settings(data_dir, clip_config, **overrides)``
adds the service-test preset on top of it (tiny random CLIP, auth off, scripted vLLM URL, fast retries).
A module with its own defaults binds them once: ``_settings = partial(bare_settings, auth_disabled=True)``
(keywords given at the call still win).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from server.settings import Settings

FAKE_VLLM_URL = "http://vllm.test:8000"


def bare_settings(**overrides: Any) -> Settings:
    """Code defaults plus ``overrides``; no .env is read (VLMRAG_* in the environment still apply)."""
    return Settings(_env_file=None, **overrides)  # type: ignore[call-arg]


def make_settings(data_dir: Path, clip_config: Path, **overrides: Any) -> Settings:
    """Settings for tests: tiny random CLIP, data under ``data_dir``, auth off, fast retries, no .env."""
    values: dict[str, Any] = {
        "data_dir": data_dir, "clip_model": str(clip_config), "clip_pretrained": "none", "clip_device": "cpu",
        "auth_disabled": True, "vllm_url": [FAKE_VLLM_URL], "vllm_model": "tiny-vlm", "rerank_scorer": "clip",
        "vllm_retry_attempts": 2, "vllm_deadline_s": 10.0, "vllm_unhealthy_for_s": 0.5, "retrieval_k": 3,
        "retrieval_pool": 8, "retrieval_threshold": 0.0,
        "vllm_max_images_per_prompt": 4,  # the tiny vLLM runs with --limit-mm-per-prompt {"image": 4}
        # OCR costs ~0.4 s an image and ~1.5 s to load on 2 cores: the tests that test it turn it on.
        "ocr_enabled": False, "ocr_query_enabled": False,
        # The ONNX export costs ~1 s per data dir; tests/test_clip_onnx.py tests that backend.
        "clip_backend": "torch",
        # The real sentence embedder: the tests of the `passage` vector set text_embedder to its folder.
        "text_embedder": "none",
        # Tests make many quick requests; the ones that test rate limiting set their own values.
        "rate_limit_rps": 10_000.0, "rate_limit_burst": 10_000,
        "rate_limit_kb_rps": 10_000.0, "rate_limit_kb_burst": 10_000,
    }
    values.update(overrides)
    return bare_settings(**values)
