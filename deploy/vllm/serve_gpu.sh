#!/usr/bin/env bash
# Serve a real vision-language model with vLLM on an NVIDIA GPU (production / staging).
#
# Prerequisite: a CUDA machine with the regular `vllm` package (pip install vllm),
# NOT the CPU venv made by setup_cpu_venv.sh. Weights come from the HF hub (or
# set VLLM_MODEL to a local folder; HF_TOKEN for gated models).
#
# Usage:  deploy/vllm/serve_gpu.sh
#   VLLM_MODEL               default Qwen/Qwen2.5-VL-3B-Instruct (7B/32B/72B work the same)
#   SERVED_MODEL_NAME        name clients send as "model" (default: same as VLLM_MODEL)
#   PORT=8000  HOST=0.0.0.0
#   MAX_MODEL_LEN=16384      context; 6 images at default resolution fit comfortably
#   TENSOR_PARALLEL_SIZE=1   see below
#   GPU_MEMORY_UTILIZATION=0.90
#   TOOL_CALL_PARSER=hermes  vLLM's tool-call parser for the model (Qwen2.5-VL: hermes; Llama 3.x:
#                            llama3_json; Mistral: mistral); "none" turns tool calling off
#   VLLM_EXTRA_ARGS="..."    anything else, appended verbatim
#
# Tensor parallelism: a 3B/7B model fits one 24-80 GB GPU (TP=1). For 32B use
# TENSOR_PARALLEL_SIZE=2 (or 4 on 24-48 GB cards), for 72B TENSOR_PARALLEL_SIZE=4 or 8.
# TP must divide the number of attention heads and should stay within one NVLink
# domain (one node); across nodes prefer --pipeline-parallel-size. To scale
# throughput rather than model size, run several TP=1 replicas behind a load
# balancer instead of a larger TP.
#
# The app talks to it as VLMRAG's OpenAI base URL: http://HOST:PORT/v1
set -euo pipefail

MODEL="${VLLM_MODEL:-Qwen/Qwen2.5-VL-3B-Instruct}"
NAME="${SERVED_MODEL_NAME:-$MODEL}"

PARSER="${TOOL_CALL_PARSER:-hermes}"
TOOL_ARGS=()
# tools / tool_choice from vlmrag's callers need the parser; "none" leaves them off
if [ "$PARSER" != "none" ]; then TOOL_ARGS=(--enable-auto-tool-choice --tool-call-parser "$PARSER"); fi

# shellcheck disable=SC2086
exec vllm serve "$MODEL" \
  --served-model-name "$NAME" \
  --host "${HOST:-0.0.0.0}" --port "${PORT:-8000}" \
  --limit-mm-per-prompt '{"image": 6}' \
  --max-model-len "${MAX_MODEL_LEN:-16384}" \
  --tensor-parallel-size "${TENSOR_PARALLEL_SIZE:-1}" \
  --gpu-memory-utilization "${GPU_MEMORY_UTILIZATION:-0.90}" \
  --max-logprobs 20 \
  "${TOOL_ARGS[@]}" \
  ${VLLM_EXTRA_ARGS:-}
