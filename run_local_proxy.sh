#!/usr/bin/env sh
# Start llm_proxy in front of a local LLM server (an Ollama on this host by default).
# Every setting can be overridden from the environment, e.g.:
#   BASE_API_URL=http://127.0.0.1:8080/v1 PROXY_API_KEYS=alice-key,bob-key ./run_local_proxy.sh
# Extra arguments are passed on (./run_local_proxy.sh --help lists every setting).
set -eu

: "${HOST:=0.0.0.0}"
: "${PORT:=8899}"
: "${BASE_API_URL:=${UPSTREAM_BASE_URL:-http://127.0.0.1:11434/v1}}"
: "${BASE_API_KEY:=${UPSTREAM_API_KEY:-}}"
: "${BASE_MODEL:=${UPSTREAM_MODEL:-}}"
: "${MAX_TOKENS:=10}"
: "${REFILL_TOKENS:=2}"
: "${REFILL_INTERVAL_SECONDS:=300}"
: "${REQUEST_TOKEN_COST:=1}"
: "${TOKEN_COST_MODE:=request}"
: "${RESPONSE_TOKEN_RESERVE:=256}"
: "${PROXY_API_KEYS:=}"
: "${LIMIT_RESPONSE:=message}"
: "${OPEN_TIMEOUT:=10}"
: "${READ_TIMEOUT:=120}"
: "${MAX_BODY_BYTES:=33554432}"
: "${TRUST_FORWARDED_FOR:=0}"
: "${KEYS_FILE:=}"
: "${ADMIN_API_KEY:=}"
: "${LOG_FORMAT:=text}"
: "${PYTHON:=python3}"

export HOST PORT BASE_API_URL BASE_API_KEY BASE_MODEL MAX_TOKENS REFILL_TOKENS \
  REFILL_INTERVAL_SECONDS REQUEST_TOKEN_COST TOKEN_COST_MODE RESPONSE_TOKEN_RESERVE \
  PROXY_API_KEYS LIMIT_RESPONSE OPEN_TIMEOUT READ_TIMEOUT MAX_BODY_BYTES TRUST_FORWARDED_FOR \
  KEYS_FILE ADMIN_API_KEY LOG_FORMAT

cd "$(dirname "$0")"
exec "$PYTHON" llm_proxy.py "$@"
