#!/usr/bin/env bash
# Offline demo: tiny random-weight CLIP + a tiny random-weight VLM served by a real vLLM (CPU),
# a few generated snippets ingested, vlmrag on http://127.0.0.1:${VLMRAG_PORT:-8080}.
# Nothing is downloaded. Answers are gibberish (random weights); every part of the plumbing is real.
# Ctrl-C stops both servers.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
DEMO_DIR="${DEMO_DIR:-.cache/demo}"
VLLM_PORT="${VLLM_PORT:-8000}"
mkdir -p "$DEMO_DIR"

CLIP_CONFIG="$(.venv/bin/python tests/support/tiny_clip.py "$DEMO_DIR")"
export VLMRAG_DATA_DIR="$DEMO_DIR/data"
export VLMRAG_CLIP_MODEL="$CLIP_CONFIG" VLMRAG_CLIP_PRETRAINED=none
export VLMRAG_VLLM_URL="http://127.0.0.1:$VLLM_PORT" VLMRAG_VLLM_MODEL=tiny-vlm
export VLMRAG_AUTH_DISABLED="${VLMRAG_AUTH_DISABLED:-true}"
export VLMRAG_PORT="${VLMRAG_PORT:-8080}"

echo "[demo] starting the tiny vLLM on 127.0.0.1:$VLLM_PORT (log: $DEMO_DIR/vllm.log)"
PORT="$VLLM_PORT" setsid bash deploy/vllm/serve_tiny_cpu.sh "$DEMO_DIR/tiny-vlm" >"$DEMO_DIR/vllm.log" 2>&1 &
VLLM_PID=$!
trap 'kill -TERM -- -$VLLM_PID 2>/dev/null || true' EXIT INT TERM

if [[ ! -d "$DEMO_DIR/inbox" ]]; then
  .venv/bin/python deploy/demo_inbox.py "$DEMO_DIR/inbox"
fi
.venv/bin/vlmrag ingest "$DEMO_DIR/inbox" --tag demo

echo "[demo] waiting for vLLM /health (30-120 s on 2 cores)"
for _ in $(seq 1 240); do
  curl -fs "http://127.0.0.1:$VLLM_PORT/health" >/dev/null 2>&1 && break
  kill -0 "$VLLM_PID" 2>/dev/null || { echo "[demo] vLLM exited; see $DEMO_DIR/vllm.log"; exit 1; }
  sleep 1
done
echo "[demo] open http://127.0.0.1:$VLMRAG_PORT/  (knowledge base: /kb)"
.venv/bin/vlmrag serve --port "$VLMRAG_PORT"
