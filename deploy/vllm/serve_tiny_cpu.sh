#!/usr/bin/env bash
# Serve a tiny random-weights Qwen2-VL with the CPU build of vLLM, in the foreground.
# For demos / `make run` / e2e tests on machines without a GPU: answers are
# gibberish, but the OpenAI API (chat, images, logprobs, streaming) is real.
#
# Usage (from anywhere):  deploy/vllm/serve_tiny_cpu.sh [MODEL_DIR]   (default .cache/tiny-vlm)
#   PORT=8000  HOST=127.0.0.1  SERVED_MODEL_NAME=tiny-vlm  VLLM_VENV=.venv-vllm
#   Extra vLLM flags: VLLM_EXTRA_ARGS="--max-num-seqs 8"
# Ready when `curl -s localhost:$PORT/health` answers 200 (about 25-70 s on 2 cores);
# ~3 GiB RSS. Ctrl-C / SIGTERM stops it within a few seconds.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"

VENV="${VLLM_VENV:-.venv-vllm}"
case "$VENV" in /*) ;; *) VENV="$REPO_ROOT/$VENV" ;; esac
PY="$VENV/bin/python"
MODEL_DIR="${1:-.cache/tiny-vlm}"
PORT="${PORT:-8000}"
HOST="${HOST:-127.0.0.1}"
NAME="${SERVED_MODEL_NAME:-tiny-vlm}"

if [[ ! -f "$VENV/.vlmrag-vllm-stamp" ]]; then
  echo "[serve_tiny_cpu] vLLM venv missing or incomplete; running setup_cpu_venv.sh"
  VLLM_VENV="$VENV" "$REPO_ROOT/deploy/vllm/setup_cpu_venv.sh"
fi

echo "[serve_tiny_cpu] building tiny model in $MODEL_DIR"
"$PY" "$REPO_ROOT/tests/support/tiny_vlm.py" "$MODEL_DIR"

export TORCHDYNAMO_DISABLE=1 VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" \
       HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
echo "[serve_tiny_cpu] serving '$NAME' on http://$HOST:$PORT/v1 (OpenAI API)"
# `python -m ...api_server` rather than the `vllm` console script: the script looks
# up the distribution "vllm", which is called "vllm-cpu" in this venv.
# shellcheck disable=SC2086
exec "$PY" -m vllm.entrypoints.openai.api_server \
  --model "$MODEL_DIR" --served-model-name "$NAME" \
  --host "$HOST" --port "$PORT" \
  --load-format dummy --dtype float32 --max-model-len 4096 --enforce-eager \
  --max-num-seqs 4 --limit-mm-per-prompt '{"image": 4}' --seed 0 \
  ${VLLM_EXTRA_ARGS:-}
