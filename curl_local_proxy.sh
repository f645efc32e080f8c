#!/usr/bin/env sh
# Smoke-test a running llm_proxy with curl: one chat completion, response headers shown.
#   ./curl_local_proxy.sh                          # the prototype's request
#   STREAM=1 ./curl_local_proxy.sh                 # the same, streamed
#   API_KEY=alice-key MODEL=qwen2.5 ./curl_local_proxy.sh
set -eu

: "${PROXY_URL:=http://127.0.0.1:${PORT:-8899}}"
: "${API_KEY:=local-test-key}"
: "${MODEL:=${BASE_MODEL:-llama3.2}}"
: "${PROMPT:=Reply with exactly: proxy ok}"
: "${REPLY_MAX_TOKENS:=16}"
: "${STREAM:=0}"

json_string() {  # escape backslashes and double quotes for a JSON string
  printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g'
}

case "$STREAM" in
  1|true|yes) stream=true ;;
  *) stream=false ;;
esac
body="{\"model\": \"$(json_string "$MODEL")\", \"messages\": [{\"role\": \"user\", \"content\": \"$(json_string "$PROMPT")\"}], \"max_tokens\": $REPLY_MAX_TOKENS, \"stream\": $stream}"

exec curl --silent --show-error --no-buffer --dump-header - \
  --header "Authorization: Bearer $API_KEY" \
  --header "Content-Type: application/json" \
  --data "$body" \
  "$PROXY_URL/v1/chat/completions"
