#!/usr/bin/env bash
# Fuzzes the HTTP API against its own OpenAPI document with schemathesis: every check, the
# tool's default settings, nothing relaxed. Two deployments are tried, each a real `stagecraft
# serve` on a free loopback port with its own temporary store: one open (loopback, no token) and
# one closed (API_TOKEN and API_TOKEN_READONLY set, requests carrying the token).
#
#   scripts/fuzz.sh            the full run (make fuzz)
#   scripts/fuzz.sh --short    a short pass (make test): fewer examples per operation
#
# schemathesis is installed from PyPI into target/fuzz-venv on first use (pinned below).
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION=4.32.5
VENV=target/fuzz-venv
EXAMPLES=()
if [ "${1:-}" = "--short" ]; then
  EXAMPLES=(--max-examples "${FUZZ_SHORT_EXAMPLES:-10}")
fi

if ! "$VENV/bin/st" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
  echo "fuzz: installing schemathesis $SCHEMATHESIS_VERSION into $VENV"
  python3 -m venv "$VENV" || {
    echo "fuzz: python3 -m venv failed; install it (Debian: apt-get install python3-venv)" >&2
    exit 1
  }
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi

cargo build --quiet --bin stagecraft
BIN=target/debug/stagecraft
WORK=$(mktemp -d)
SERVER=""
stop() {
  if [ -n "$SERVER" ]; then
    kill "$SERVER" 2>/dev/null || true
    wait "$SERVER" 2>/dev/null || true
    SERVER=""
  fi
}
# shellcheck disable=SC2317 # called by the trap
cleanup() {
  stop
  rm -rf "$WORK"
}
trap cleanup EXIT

# Starts `stagecraft serve` with the given extra variables; sets URL and SERVER.
serve() {
  local name=$1
  shift
  mkdir -p "$WORK/$name"
  env -i PATH="$PATH" HOME="$HOME" \
    DATA_DIR="$WORK/$name/data" ARTIFACT_DIR="$WORK/$name/artifacts" \
    HOST=127.0.0.1 PORT=0 LOG_FORMAT=json LOG_LEVEL=warn SYNC_WAIT_SECS=0 "$@" \
    "$BIN" serve >"$WORK/$name/stdout" 2>"$WORK/$name/log" &
  SERVER=$!
  for _ in $(seq 1 200); do
    URL=$(sed -n 's/^stagecraft: listening on //p' "$WORK/$name/stdout" | head -n 1)
    [ -n "$URL" ] && return 0
    sleep 0.05
  done
  echo "fuzz: the $name server did not start:" >&2
  cat "$WORK/$name/log" >&2
  exit 1
}

status=0
serve open
echo "fuzz: open deployment at $URL"
"$VENV/bin/st" run "$URL/openapi.json" --checks all "${EXAMPLES[@]}" || status=1
stop

token="fuzz-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
serve closed API_TOKEN="$token" API_TOKEN_READONLY="read-$token"
echo "fuzz: deployment with tokens at $URL"
"$VENV/bin/st" run "$URL/openapi.json" --checks all "${EXAMPLES[@]}" \
  -H "Authorization: Bearer $token" || status=1
stop
exit $status
