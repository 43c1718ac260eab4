#!/usr/bin/env bash
# Serve the `rerank` scorer's cross-encoder with vLLM's pooling runner on an NVIDIA GPU, beside the
# answering model (deploy/vllm/serve_gpu.sh). vlmrag reaches it as VLMRAG_RANKER_URL=http://HOST:PORT
# and asks for VLMRAG_RANKER_MODEL (= SERVED_MODEL_NAME); it posts every candidate in one /rerank call.
#
# Usage:  deploy/vllm/serve_ranker_gpu.sh
#   RANKER_MODEL          default jinaai/jina-reranker-m0 (JinaVLForRanking, Qwen2-VL based, 2.4B).
#                         Its licence is CC-BY-NC-4.0: NON-COMMERCIAL use only. For commercial use serve
#                         another ranker vLLM supports, e.g. nvidia/llama-nemotron-rerank-vl
#                         (LlamaNemotronVLForSequenceClassification) -- check its licence first.
#   SERVED_MODEL_NAME     name clients send as "model" (default: same as RANKER_MODEL)
#   PORT=8001  HOST=0.0.0.0  MAX_MODEL_LEN=10240  GPU_MEMORY_UTILIZATION=0.90
#   VLLM_EXTRA_ARGS="..." anything else, appended verbatim
# On the answering model's GPU: lower both GPU_MEMORY_UTILIZATIONs (e.g. 0.55 and 0.30).
set -euo pipefail

MODEL="${RANKER_MODEL:-jinaai/jina-reranker-m0}"
NAME="${SERVED_MODEL_NAME:-$MODEL}"

# --runner pooling: without it a generative runner starts and serves no /rerank (vlmrag's /readyz says so)
# shellcheck disable=SC2086
exec vllm serve "$MODEL" \
  --runner pooling \
  --served-model-name "$NAME" \
  --host "${HOST:-0.0.0.0}" --port "${PORT:-8001}" \
  --limit-mm-per-prompt '{"image": 5}' \
  --max-model-len "${MAX_MODEL_LEN:-10240}" \
  --gpu-memory-utilization "${GPU_MEMORY_UTILIZATION:-0.90}" \
  ${VLLM_EXTRA_ARGS:-}
