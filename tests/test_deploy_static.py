"""Static checks of deploy/ (no Docker engine or cluster here): Dockerfile, compose, kustomize, Helm values.

The kustomize overlays are rendered in pure Python (resources, generators, strategic-merge patches
for the shapes we use, image overrides) so the checks see what `kubectl apply -k` would apply.
Every ``VLMRAG_*`` variable set anywhere must be a Settings field, and the values set must validate.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.settings import Settings
from tests.support.settings import bare_settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("dev", "production")
PREFIX = Settings.model_config["env_prefix"]
SETTING_VARS = {PREFIX + name.upper() for name in Settings.model_fields}
# What a containerised vlmrag must be told: where Qdrant and vLLM are, which model, which keys.
REQUIRED_VARS = {f"{PREFIX}QDRANT_URL", f"{PREFIX}VLLM_URL", f"{PREFIX}VLLM_MODEL", f"{PREFIX}API_KEYS"}
SECRET_NAME = re.compile(r"(API_KEYS?|TOKEN|SECRET|PASSWORD|ACCESS_KEY)", re.IGNORECASE)
# Shapes of real credentials that must never appear in a committed deploy file.
SECRET_LITERALS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),  # AWS access key id
    re.compile(r"\bhf_[A-Za-z0-9]{30,}"),  # Hugging Face token
    re.compile(r"\bsk-[A-Za-z0-9_-]{20,}"),  # OpenAI-style key
    re.compile(r"\bvlmrag-[A-Za-z0-9_-]{40,}"),  # a key printed by `vlmrag keygen`
    re.compile(r"sha256:[0-9a-f]{64}"),  # a hashed key entry: belongs in a secret, not in git
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


# --- helpers -----------------------------------------------------------------------------------
def load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def interpolate(text: str, env: dict[str, str] | None = None) -> str:
    """Compose-style ``${VAR}``, ``${VAR:-default}``, ``${VAR:?err}`` and ``$$`` with ``env`` (default empty)."""
    env = env or {}

    def repl(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group(1), match.group(2), match.group(3) or ""
        value = env.get(name)
        if op in (":-", "-"):
            return value if value or (op == "-" and value is not None) else arg
        return value or ""

    return re.sub(r"\$\$|" + INTERPOLATION.pattern, repl, text)


def referenced_vars(text: str) -> set[str]:
    return {m.group(1) for m in INTERPOLATION.finditer(text.replace("$$", ""))}


def settings_from_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Settings:
    """Build Settings from exactly these VLMRAG_* variables (nothing from the process or a .env)."""
    import os

    for key in list(os.environ):
        if key.startswith(PREFIX):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return bare_settings()


def image_is_pinned(image: str) -> bool:
    """True for ``repo:tag`` with a real version tag, or a digest; never ``latest`` or untagged."""
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag or not tag:
        return False
    return tag != "latest" and bool(re.search(r"\d", tag))


def parse_env_file(path: Path, *, include_commented: bool = False) -> dict[str, str]:
    """``KEY=VALUE`` lines of a dotenv file (optionally also ``# KEY=VALUE`` examples)."""
    out: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if include_commented and line.startswith("#"):
            line = line.lstrip("#").strip()
            if not re.match(r"^[A-Z][A-Z0-9_]*=", line):
                continue
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        out[key.strip()] = value.strip()
    return out


def strategic_merge(base: Any, patch: Any) -> Any:
    """Kubernetes strategic merge for the shapes used here: maps merge, null deletes, lists of
    named items (containers, volumes, env, ports) merge by ``name``, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = strategic_merge(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
        return out
    if (isinstance(base, list) and isinstance(patch, list) and patch
            and all(isinstance(i, dict) and "name" in i for i in base + patch)):
        merged = [copy.deepcopy(i) for i in base]
        for item in patch:
            idx = next((n for n, old in enumerate(merged) if old["name"] == item["name"]), None)
            if idx is None:
                merged.append(copy.deepcopy(item))
            else:
                merged[idx] = strategic_merge(merged[idx], item)
        return merged
    return copy.deepcopy(patch)


class Rendered:
    """What a kustomization produces: objects, generated config maps and secrets, referenced files."""

    def __init__(self) -> None:
        self.objects: list[dict[str, Any]] = []
        self.configmaps: dict[str, dict[str, str]] = {}
        self.secret_files: dict[str, dict[str, Path]] = {}
        self.images: list[dict[str, str]] = []
        self.namespace: str | None = None

    def find(self, kind: str, name: str) -> dict[str, Any]:
        found = [o for o in self.objects if o["kind"] == kind and o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
        return found[0]


def render(directory: Path) -> Rendered:
    """Render a kustomization directory (recursively), asserting every referenced file exists."""
    kfile = directory / "kustomization.yaml"
    assert kfile.is_file(), f"{directory} has no kustomization.yaml"
    kust = yaml.safe_load(kfile.read_text(encoding="utf-8"))
    out = Rendered()
    for entry in kust.get("resources", []):
        target = (directory / entry).resolve()
        assert target.exists(), f"{kfile}: resource {entry} does not exist"
        if target.is_dir():
            sub = render(target)
            out.objects += sub.objects
            out.configmaps.update(sub.configmaps)
            out.secret_files.update(sub.secret_files)
            out.images += sub.images
        else:
            out.objects += load_all(target)
    for gen in kust.get("configMapGenerator", []):
        data = dict(out.configmaps.get(gen["name"], {})) if gen.get("behavior") == "merge" else {}
        if gen.get("behavior") == "merge":
            assert gen["name"] in out.configmaps, f"{kfile}: merge into unknown ConfigMap {gen['name']}"
        for env_file in gen.get("envs", []):
            path = directory / env_file
            assert path.is_file(), f"{kfile}: configMapGenerator env file {env_file} does not exist"
            data.update(parse_env_file(path))
        for literal in gen.get("literals", []):
            key, _, value = literal.partition("=")
            data[key] = value
        out.configmaps[gen["name"]] = data
    for gen in kust.get("secretGenerator", []):
        files: dict[str, Path] = {}
        for spec in gen.get("files", []):
            key, _, rel = spec.partition("=") if "=" in spec else (Path(spec).name, "", spec)
            path = directory / rel
            assert path.is_file(), f"{kfile}: secretGenerator file {rel} does not exist"
            files[key] = path
        assert not gen.get("literals"), f"{kfile}: secret literals would put secrets inline"
        out.secret_files[gen["name"]] = files
    for patch in kust.get("patches", []):
        assert "path" in patch, f"{kfile}: only file patches are used here"
        path = directory / patch["path"]
        assert path.is_file(), f"{kfile}: patch {patch['path']} does not exist"
        for doc in load_all(path):
            target = out.find(doc["kind"], doc["metadata"]["name"])
            target.update(strategic_merge(target, doc))
    out.images += kust.get("images", [])
    if kust.get("namespace"):
        out.namespace = kust["namespace"]
    return out


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj["spec"]["template"]["spec"]
    return spec.get("containers", []) + spec.get("initContainers", [])


def resolved_image(image: str, overrides: list[dict[str, str]]) -> str:
    """Apply kustomize ``images`` overrides (later entries, i.e. overlays, win)."""
    head, _, tail = image.rpartition(":")
    name, tag = (head, tail) if head and "/" not in tail else (image, "")
    for override in overrides:
        if override["name"] == name:
            if override.get("digest"):
                return f"{override.get('newName', name)}@{override['digest']}"
            name, tag = override.get("newName", name), override.get("newTag", tag)
    return f"{name}:{tag}" if tag else name


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instr, _, args = line.partition(" ")
            out.append((instr.upper(), args.strip()))
    return out


# --- all files ---------------------------------------------------------------------------------
YAML_FILES = sorted(p for p in DEPLOY.rglob("*.yaml"))
# The deployment files proper (deploy/vllm/ and the demo scripts are dev tooling, checked elsewhere).
DEPLOY_FILES = sorted(
    [DEPLOY / name for name in ("Dockerfile", "Dockerfile.dockerignore", "compose.yaml", ".env.example", "README.md")]
    + [p for p in K8S.rglob("*") if p.is_file()]
)


def test_deploy_files_exist() -> None:
    for rel in ("Dockerfile", "compose.yaml", ".env.example", "README.md", "k8s/qdrant-values.yaml",
                "k8s/base/kustomization.yaml", "k8s/overlays/dev/kustomization.yaml",
                "k8s/overlays/production/kustomization.yaml"):
        assert (DEPLOY / rel).is_file(), f"deploy/{rel} is missing"


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    assert load_all(path), f"{path} is empty"


@pytest.mark.parametrize(
    "path", [p for p in DEPLOY_FILES if p.suffix != ".md"],
    ids=lambda p: str(p.relative_to(DEPLOY)),
)
def test_no_secret_literals(path: Path) -> None:
    text = path.read_text(encoding="utf-8", errors="replace")
    for pattern in SECRET_LITERALS:
        assert not pattern.search(text), f"{path}: looks like an inline secret ({pattern.pattern})"


def test_every_vlmrag_variable_named_in_deploy_files_is_a_setting() -> None:
    """Any VLMRAG_* token in deploy files (set, referenced or documented) must be a Settings field."""
    unknown: dict[str, set[str]] = {}
    for path in DEPLOY_FILES:
        for token in re.findall(rf"\b{PREFIX}[A-Z0-9_]+\b", path.read_text(encoding="utf-8", errors="replace")):
            if token not in SETTING_VARS:
                unknown.setdefault(token, set()).add(str(path.relative_to(DEPLOY)))
    assert not unknown, f"VLMRAG_* names that are not settings: {unknown}"


# --- Dockerfile --------------------------------------------------------------------------------
def test_dockerfile_multistage_pinned_nonroot() -> None:
    instrs = dockerfile_instructions()
    args = {}
    for instr, rest in instrs:
        if instr == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args.setdefault(key, value)
    froms = [rest for instr, rest in instrs if instr == "FROM"]
    assert len(froms) >= 2, "the Dockerfile must be multi-stage"
    for line in froms:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), line.split()[0])
        assert image_is_pinned(image), f"base image {image!r} is not pinned to a version"
        assert "slim" in image, f"base image {image!r} is not a slim image"
    users = [rest for instr, rest in instrs if instr == "USER"]
    assert users, "the runtime image must switch to a non-root USER"
    assert users[-1].split(":")[0] not in ("root", "0"), "last USER is root"
    assert args.get("TORCH_VARIANT") == "cpu", "CPU torch must be the default build"
    assert args.get("TORCH_INDEX_URL") == "https://download.pytorch.org/whl/${TORCH_VARIANT}"


def test_dockerfile_torch_pins_match_pyproject() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    args = dict(rest.partition("=")[::2] for instr, rest in dockerfile_instructions() if instr == "ARG")
    assert f'"torch=={args["TORCH_VERSION"]}"' in pyproject
    assert f'"torchvision=={args["TORCHVISION_VERSION"]}"' in pyproject


def test_dockerfile_runtime_contract() -> None:
    instrs = dockerfile_instructions()
    health = [rest for instr, rest in instrs if instr == "HEALTHCHECK"]
    assert health and "/healthz" in health[-1] and "python" in health[-1], "HEALTHCHECK on /healthz"
    assert "curl" not in health[-1], "the slim image has no curl"
    volumes = [rest for instr, rest in instrs if instr == "VOLUME"]
    assert any("/data" in v for v in volumes), "data dir must be a VOLUME"
    env_text = " ".join(rest for instr, rest in instrs if instr == "ENV")
    env = dict(re.findall(r"(\w+)=(\S+)", env_text))
    assert env.get(f"{PREFIX}HOST") == "0.0.0.0", "the container must listen beyond loopback"
    assert env.get(f"{PREFIX}DATA_DIR") == "/data"
    for key in env:
        if key.startswith(PREFIX):
            assert key in SETTING_VARS, f"Dockerfile sets unknown setting {key}"
    entry = json.loads([rest for instr, rest in instrs if instr == "ENTRYPOINT"][-1])
    cmd = json.loads([rest for instr, rest in instrs if instr == "CMD"][-1])
    assert entry + cmd == ["vlmrag", "serve"]


def test_dockerfile_copies_existing_paths_and_preloads_default_clip() -> None:
    instrs = dockerfile_instructions()
    for instr, rest in instrs:
        if instr == "COPY" and "--from" not in rest:
            for src in rest.split()[:-1]:
                assert (ROOT / src).exists(), f"COPY source {src} does not exist in the build context"
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    for needed in ("pyproject.toml", "README.md", "server/", "retriever/", "prompts/"):
        assert f"!{needed}" in ignore, f"{needed} is excluded from the build context"
    args = dict(rest.partition("=")[::2] for instr, rest in instrs if instr == "ARG")
    defaults = Settings.model_fields
    assert args["CLIP_PRELOAD"] == f"{defaults['clip_model'].default}:{defaults['clip_pretrained'].default}"


# --- compose -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))


def _env_map(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def test_compose_services_images_and_health(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"qdrant", "vllm", "vlmrag"} <= set(services)
    for name, svc in services.items():
        image = interpolate(svc.get("image", ""))
        assert image, f"service {name} has no image name"
        assert image_is_pinned(image), f"service {name}: image {image!r} not pinned"
        if "build" in svc:
            assert svc["build"]["dockerfile"] == "deploy/Dockerfile"
            assert (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
        else:
            test = svc.get("healthcheck", {}).get("test")
            assert test, f"service {name} has no healthcheck"
    assert services["qdrant"]["image"].startswith("qdrant/qdrant:")
    assert services["vllm"]["image"].startswith("vllm/vllm-openai:")
    assert any("/readyz" in str(part) for part in services["qdrant"]["healthcheck"]["test"])
    assert any("/health" in str(part) for part in services["vllm"]["healthcheck"]["test"])
    assert any(str(v).split(":")[1] == "/qdrant/storage" for v in services["qdrant"]["volumes"])


def test_compose_vllm_gpu_model_and_image_limit(compose: dict[str, Any]) -> None:
    for name in ("vllm", "vllm-rerank"):
        svc = compose["services"][name]
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
        command = [str(c) for c in svc["command"]]
        limit = json.loads(command[command.index("--limit-mm-per-prompt") + 1])
        assert limit["image"] >= 1
        assert any("/root/.cache/huggingface" in str(v) for v in svc["volumes"]), "HF cache volume"
        assert _env_map(svc)["HF_TOKEN"].startswith("${"), "HF token must come from the environment"
    vllm = compose["services"]["vllm"]
    command = [str(c) for c in vllm["command"]]
    assert interpolate(command[0]) == "Qwen/Qwen2.5-VL-3B-Instruct" and "VLLM_MODEL" in command[0]
    assert json.loads(command[command.index("--limit-mm-per-prompt") + 1]) == {"image": 6}
    # callers' tools need the parser that fits the default model
    assert "--enable-auto-tool-choice" in command
    assert interpolate(command[command.index("--tool-call-parser") + 1]) == "hermes"
    assert compose["services"]["vllm-rerank"]["profiles"] == ["rerank"]


def test_compose_vlmrag_configured_only_through_env(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = compose["services"]["vlmrag"]
    for dep in ("qdrant", "vllm"):
        assert svc["depends_on"][dep]["condition"] == "service_healthy"
    env = _env_map(svc)
    unknown = {k for k in env if k.startswith(PREFIX)} - SETTING_VARS
    assert not unknown, f"compose sets unknown settings: {unknown}"
    missing = REQUIRED_VARS - set(env)
    assert not missing, f"compose vlmrag service lacks {missing}"
    resolved = {k: interpolate(v) for k, v in env.items()}
    assert resolved[f"{PREFIX}QDRANT_URL"] == "http://qdrant:6333"
    assert resolved[f"{PREFIX}VLLM_URL"] == "http://vllm:8000"
    # the model vlmrag asks for is the one vLLM serves
    assert resolved[f"{PREFIX}VLLM_MODEL"] == interpolate(str(compose["services"]["vllm"]["command"][0]))
    settings = settings_from_env(monkeypatch, {k: v for k, v in resolved.items() if k.startswith(PREFIX)})
    assert settings.qdrant_url == "http://qdrant:6333" and settings.host == "0.0.0.0"
    assert any(str(v).endswith(":/data/inbox") or ":/data/inbox:" in str(v) for v in svc["volumes"])


def test_compose_no_inline_secrets(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        for key, value in _env_map(svc).items():
            if SECRET_NAME.search(key):
                assert value == "" or re.fullmatch(r"\$\{[A-Za-z0-9_]+(:?[-?][^}]*)?\}", value), (
                    f"{name}.{key} must reference a variable, not hold a value"
                )
                default = INTERPOLATION.fullmatch(value)
                assert not (default and default.group(2) == ":-" and default.group(3)), (
                    f"{name}.{key} has an inline default"
                )


def test_env_example_covers_compose_and_holds_no_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    text = (DEPLOY / "compose.yaml").read_text(encoding="utf-8")
    documented = parse_env_file(DEPLOY / ".env.example", include_commented=True)
    undocumented = referenced_vars(text) - set(documented)
    assert not undocumented, f"compose variables missing from .env.example: {undocumented}"
    active = parse_env_file(DEPLOY / ".env.example")
    for key, value in active.items():
        if SECRET_NAME.search(key):
            assert value == "", f".env.example: {key} must be left empty"
    settings_env = {k: v for k, v in documented.items() if k.startswith(PREFIX) and v}
    assert set(settings_env) <= SETTING_VARS
    settings_from_env(monkeypatch, settings_env)  # the example values validate


# --- kubernetes --------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, Rendered]:
    return request.param, render(K8S / "overlays" / request.param)


def test_k8s_base_renders() -> None:
    base = render(K8S / "base")
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in base.objects)
    for expected in [("Deployment", "vlmrag"), ("Service", "vlmrag"), ("HorizontalPodAutoscaler", "vlmrag"),
                     ("PodDisruptionBudget", "vlmrag"), ("Deployment", "vllm"), ("Service", "vllm"),
                     ("PersistentVolumeClaim", "vllm-model-cache")]:
        assert expected in kinds, f"base lacks {expected}"
    assert "vlmrag-config" in base.configmaps and "vlmrag-api-keys" in base.secret_files


def test_k8s_images_pinned(overlay: tuple[str, Rendered]) -> None:
    name, rendered = overlay
    for obj in rendered.objects:
        if obj["kind"] in ("Deployment", "StatefulSet"):
            for c in containers(obj):
                image = resolved_image(c["image"], rendered.images)
                assert image_is_pinned(image), f"{name}: {obj['metadata']['name']} image {image!r} not pinned"


def test_k8s_vlmrag_probes_config_and_secrets(
    overlay: tuple[str, Rendered], monkeypatch: pytest.MonkeyPatch
) -> None:
    name, rendered = overlay
    deploy = rendered.find("Deployment", "vlmrag")
    (c,) = [c for c in containers(deploy) if c["name"] == "vlmrag"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    sec = deploy["spec"]["template"]["spec"]["securityContext"]
    assert sec["runAsNonRoot"] is True and sec["runAsUser"] != 0
    refs = [e["configMapRef"]["name"] for e in c.get("envFrom", []) if "configMapRef" in e]
    assert refs and all(r in rendered.configmaps for r in refs)
    env: dict[str, str] = {}
    for ref in refs:
        env.update(rendered.configmaps[ref])
    for item in c.get("env", []):
        assert "valueFrom" in item or not SECRET_NAME.search(item["name"]), (
            f"{name}: env {item['name']} must come from a secretKeyRef"
        )
        if item["name"].startswith(PREFIX):
            assert item["name"] in SETTING_VARS, f"{name}: unknown setting {item['name']}"
    unknown = {k for k in env if k.startswith(PREFIX)} - SETTING_VARS
    assert not unknown, f"{name}: ConfigMap sets unknown settings {unknown}"
    missing = REQUIRED_VARS - set(env)
    assert not missing, f"{name}: ConfigMap lacks {missing}"
    for key, value in env.items():
        if SECRET_NAME.search(key):
            assert value.startswith("@/"), f"{name}: {key} in a ConfigMap must be an @file reference"
    # the API keys file the config points at is the mounted Secret
    keys_path = Path(env[f"{PREFIX}API_KEYS"][1:])
    volumes = {v["name"]: v for v in deploy["spec"]["template"]["spec"]["volumes"]}
    mount = next(m for m in c["volumeMounts"] if keys_path.is_relative_to(m["mountPath"]))
    secret_name = volumes[mount["name"]]["secret"]["secretName"]
    assert keys_path.name in rendered.secret_files[secret_name]
    settings = settings_from_env(monkeypatch, env)
    assert settings.host == "0.0.0.0" and settings.qdrant_url


def test_k8s_api_keys_placeholder_holds_no_key() -> None:
    text = (K8S / "base" / "api-keys.txt").read_text(encoding="utf-8")
    assert all(not line.strip() or line.lstrip().startswith("#") for line in text.splitlines())


def test_k8s_vllm_gpu_probes_and_cache(overlay: tuple[str, Rendered]) -> None:
    name, rendered = overlay
    deploy = rendered.find("Deployment", "vllm")
    (c,) = containers(deploy)
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"]
    args = [str(a) for a in c["args"]]
    assert json.loads(args[args.index("--limit-mm-per-prompt") + 1])["image"] >= 1
    assert "--enable-auto-tool-choice" in args and args[args.index("--tool-call-parser") + 1] == "hermes"
    tp = int(args[args.index("--tensor-parallel-size") + 1])
    assert tp == int(c["resources"]["limits"]["nvidia.com/gpu"]), "one GPU per tensor-parallel rank"
    config = rendered.configmaps["vlmrag-config"]
    assert config[f"{PREFIX}VLLM_MODEL"] == args[0], "vlmrag must ask for the model vLLM serves"
    claims = [v["persistentVolumeClaim"]["claimName"] for v in deploy["spec"]["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v]
    assert claims and all(any(o["kind"] == "PersistentVolumeClaim" and o["metadata"]["name"] == cl
                              for o in rendered.objects) for cl in claims)
    replicas = deploy["spec"]["replicas"]
    pvc = rendered.find("PersistentVolumeClaim", "vllm-model-cache")
    if replicas > 1:
        assert "ReadWriteMany" in pvc["spec"]["accessModes"], f"{name}: shared cache needs RWX"


def test_k8s_overlay_shapes() -> None:
    dev = render(K8S / "overlays" / "dev")
    prod = render(K8S / "overlays" / "production")
    assert dev.find("Deployment", "vlmrag")["spec"]["replicas"] == 1
    assert dev.find("HorizontalPodAutoscaler", "vlmrag")["spec"]["maxReplicas"] == 1
    assert dev.find("StatefulSet", "qdrant")["spec"]["replicas"] == 1
    assert "minAvailable" not in dev.find("PodDisruptionBudget", "vlmrag")["spec"]
    hpa = prod.find("HorizontalPodAutoscaler", "vlmrag")["spec"]
    assert 2 <= hpa["minReplicas"] < hpa["maxReplicas"]
    assert prod.find("PodDisruptionBudget", "vlmrag")["spec"]["minAvailable"] < hpa["minReplicas"]
    assert prod.find("Deployment", "vllm")["spec"]["replicas"] >= 2
    config = prod.configmaps["vlmrag-config"]
    assert config[f"{PREFIX}BLOB_BACKEND"] == "s3", "replicas share blobs only through object storage"
    assert int(config[f"{PREFIX}QDRANT_REPLICATION_FACTOR"]) >= 2
    assert not any(o["kind"] == "StatefulSet" for o in prod.objects), "production Qdrant comes from Helm"
    assert prod.namespace and dev.namespace and prod.namespace != dev.namespace


def test_qdrant_helm_values_cluster_mode() -> None:
    (values,) = load_all(K8S / "qdrant-values.yaml")
    assert values["replicaCount"] >= 3
    assert values["config"]["cluster"]["enabled"] is True
    assert values["config"]["storage"]["collection"]["replication_factor"] >= 2
    assert values["persistence"]["size"]
    assert image_is_pinned(f"{values['image']['repository']}:{values['image']['tag']}")
    prod = render(K8S / "overlays" / "production")
    assert prod.configmaps["vlmrag-config"][f"{PREFIX}QDRANT_URL"] == "http://qdrant:6333"  # release "qdrant"


def test_renderer_catches_missing_files(tmp_path: Path) -> None:
    """The pure-Python renderer is only worth something if it fails on a dangling reference."""
    (tmp_path / "kustomization.yaml").write_text("resources: [missing.yaml]\n", encoding="utf-8")
    with pytest.raises(AssertionError, match="does not exist"):
        render(tmp_path)


def test_interpolate_and_pinning_helpers() -> None:
    assert interpolate("${A:-x}/${B}/$${C}", {"B": "b"}) == "x/b/${C}"
    assert image_is_pinned("qdrant/qdrant:v1.20.0") and image_is_pinned("localhost:5000/x:1.2")
    assert not image_is_pinned("qdrant/qdrant") and not image_is_pinned("vllm/vllm-openai:latest")
    assert not image_is_pinned("localhost:5000/x")
    assert resolved_image("vlmrag", [{"name": "vlmrag", "newName": "r.io/v", "newTag": "1.0"}]) == "r.io/v:1.0"
    assert resolved_image("a/b:2", [{"name": "c", "newTag": "3"}]) == "a/b:2"


@pytest.mark.subprocess
@pytest.mark.parametrize("parser, expected", [(None, ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]),
                                              ("llama3_json", ["--tool-call-parser", "llama3_json"]),
                                              ("none", [])])
def test_serve_gpu_starts_vllm_with_the_tool_call_parser(tmp_path: Path, parser: str | None,
                                                         expected: list[str]) -> None:
    """Run the real script with a stand-in `vllm` on PATH that prints the arguments it got."""
    import os
    import subprocess

    fake = tmp_path / "vllm"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    if parser is not None:
        env["TOOL_CALL_PARSER"] = parser
    script = Path(__file__).resolve().parents[1] / "deploy" / "vllm" / "serve_gpu.sh"
    args = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, check=True).stdout.split("\n")
    assert args[0] == "serve" and "--limit-mm-per-prompt" in args
    joined = " ".join(args)
    assert " ".join(expected) in joined
    if not expected:
        assert "--tool-call-parser" not in args and "--enable-auto-tool-choice" not in args
