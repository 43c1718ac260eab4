"""Static checks of the ranker's deploy files (the `rerank` scorer's cross-encoder on vLLM --runner pooling):
compose service, the opt-in k8s directory, the serve script, and the licence note where it is deployed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_deploy_static import (
    DEPLOY,
    K8S,
    OVERLAYS,
    PREFIX,
    _env_map,
    containers,
    image_is_pinned,
    interpolate,
    render,
    resolved_image,
    settings_from_env,
)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))


def test_compose_ranker_is_a_pooling_vllm_vlmrag_asks_for(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    ranker = compose["services"]["ranker"]
    assert ranker["profiles"] == ["ranker"], "opt-in: the default model is CC-BY-NC (non-commercial)"
    assert ranker["image"].startswith("vllm/vllm-openai:")
    command = [str(c) for c in ranker["command"]]
    assert command[command.index("--runner") + 1] == "pooling", "a generate runner serves no /rerank"
    assert json.loads(command[command.index("--limit-mm-per-prompt") + 1])["image"] >= 2  # query + snippet image
    devices = ranker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" for d in devices)
    assert any("/health" in str(part) for part in ranker["healthcheck"]["test"])
    env = {k: interpolate(v) for k, v in _env_map(compose["services"]["vlmrag"]).items()}
    assert env[f"{PREFIX}RANKER_MODEL"] == interpolate(command[0]) == "jinaai/jina-reranker-m0"
    assert env[f"{PREFIX}RANKER_URL"] == "", "no ranker unless the profile is started and the URL set"
    settings = settings_from_env(monkeypatch, {f"{PREFIX}RANKER_URL": "http://ranker:8000/",
                                               f"{PREFIX}RANKER_MODEL": env[f"{PREFIX}RANKER_MODEL"]})
    assert settings.ranker_url == ["http://ranker:8000"]


def test_licence_of_the_default_ranker_is_stated_where_it_is_deployed() -> None:
    for rel in ("compose.yaml", ".env.example", "README.md", "k8s/ranker/kustomization.yaml",
                "vllm/serve_ranker_gpu.sh"):
        text = (DEPLOY / rel).read_text(encoding="utf-8")
        assert "CC-BY-NC" in text and "commercial" in text, f"deploy/{rel} must state the ranker's licence"


def test_k8s_ranker_opt_in_renders_beside_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An overlay that opts in (base + ../../ranker + the URL literal), rendered like kubectl apply -k."""
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [str(K8S / "base"), str(K8S / "ranker")],
        "configMapGenerator": [{"name": "vlmrag-config", "behavior": "merge",
                                "literals": [f"{PREFIX}RANKER_URL=http://ranker:8000"]}],
    }), encoding="utf-8")
    rendered = render(tmp_path)
    deploy = rendered.find("Deployment", "ranker")
    (c,) = containers(deploy)
    args = [str(a) for a in c["args"]]
    assert args[args.index("--runner") + 1] == "pooling"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert image_is_pinned(resolved_image(c["image"], rendered.images))
    service = rendered.find("Service", "ranker")
    assert service["spec"]["selector"] == deploy["spec"]["template"]["metadata"]["labels"]
    port = service["spec"]["ports"][0]["port"]
    config = rendered.configmaps["vlmrag-config"]
    assert config[f"{PREFIX}RANKER_URL"] == f"http://ranker:{port}"
    settings = settings_from_env(monkeypatch, config)
    assert settings.ranker_url == ["http://ranker:8000"] and settings.ranker_model == args[0]
    for overlay in OVERLAYS:  # neither shipped overlay deploys the non-commercial model by default
        assert not [o for o in render(K8S / "overlays" / overlay).objects if o["metadata"]["name"] == "ranker"]


@pytest.mark.subprocess
def test_serve_ranker_gpu_starts_the_pooling_runner(tmp_path: Path) -> None:
    import os
    import subprocess

    fake = tmp_path / "vllm"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    script = DEPLOY / "vllm" / "serve_ranker_gpu.sh"
    args = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, check=True).stdout.split("\n")
    assert args[:2] == ["serve", "jinaai/jina-reranker-m0"]
    assert args[args.index("--runner") + 1] == "pooling" and "--limit-mm-per-prompt" in args
