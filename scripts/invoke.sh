#!/usr/bin/env bash
# Quick agent and workflow invocation against a running Stagecraft API.
#
#   scripts/invoke.sh agent producer '{"inputs":{"user_request":"test","total_budget":100}}'
#   scripts/invoke.sh workflow full_production '{"inputs":{"user_request":"A day in the life","total_budget":150},"async":true}'
#   scripts/invoke.sh status <run_id>
#   scripts/invoke.sh resume full_production <run_id> '{"from_stage":"evaluation"}'
#   scripts/invoke.sh artifacts <run_id>
#
# ENDPOINT (default http://localhost:8000) is the API; API_TOKEN, when set, is sent as a bearer
# token without appearing on any command line. Output is pretty-printed with jq when it is
# installed.
set -euo pipefail

ENDPOINT=${ENDPOINT:-http://localhost:8000}

usage() {
  echo "Usage: $0 {agent|workflow|status|resume|artifacts} <name|run_id> [json_body]" >&2
  echo "Example: $0 agent producer '{\"inputs\":{\"user_request\":\"test\",\"total_budget\":100}}'" >&2
  exit 1
}

pretty() {
  if command -v jq >/dev/null 2>&1; then jq .; else cat; echo; fi
}

request() {
  local method=$1 path=$2 body=${3:-}
  local args=(-sS -X "$method" "$ENDPOINT$path" -H "Content-Type: application/json")
  if [ -n "${API_TOKEN:-}" ]; then
    args+=(-H @<(printf 'Authorization: Bearer %s\n' "$API_TOKEN"))
  fi
  if [ -n "$body" ]; then
    args+=(--data-binary "$body")
  fi
  curl "${args[@]}" | pretty
}

[ $# -ge 2 ] || usage
case "$1" in
  agent)
    request POST "/agents/$2/run" "${3:-}"
    ;;
  workflow)
    request POST "/workflows/$2/run" "${3:-}"
    ;;
  status)
    request GET "/workflows/status/$2"
    ;;
  resume)
    [ $# -ge 3 ] || usage
    empty='{}'
    request POST "/workflows/$2/resume/$3" "${4:-$empty}"
    ;;
  artifacts)
    request GET "/artifacts/runs/$2"
    ;;
  *)
    usage
    ;;
esac
