#!/usr/bin/env bash
# `make run`: start vlmrag with the settings from VLMRAG_* variables and ./.env.
# Auth stays on. On a fresh machine (no ./.env, and neither VLMRAG_API_KEYS nor VLMRAG_AUTH_DISABLED
# in the environment) one admin API key is created first: its hash goes into ./.env (git-ignored),
# the key itself is printed once. Arguments go to `vlmrag serve` (e.g. --port 9000).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VLMRAG="${VLMRAG:-$ROOT/.venv/bin/vlmrag}"

if [[ ! -e .env && -z "${VLMRAG_API_KEYS+set}" && -z "${VLMRAG_AUTH_DISABLED+set}" ]]; then
  echo "No .env and no VLMRAG_API_KEYS: creating an admin API key (auth stays on)."
  "$VLMRAG" keygen --scope admin --env-file .env
  echo
fi
exec "$VLMRAG" serve "$@"
