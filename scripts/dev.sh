#!/usr/bin/env bash
# Quick development commands: the API and workers in one process (embedded store, mock
# providers unless asked otherwise), in the background, with its log and pid under .run/.
#
#   scripts/dev.sh up      start on http://localhost:${PORT:-8000}
#   scripts/dev.sh live    start with PROVIDER_MODE=live (keys from .env)
#   scripts/dev.sh down    stop it
#   scripts/dev.sh logs    follow its log
#   scripts/dev.sh status  say whether it runs, and its health
#   scripts/dev.sh shell   a shell with STAGECRAFT_URL pointing at it (for `stagecraft submit …`)
#   scripts/dev.sh test    run the test suite (make test)
set -euo pipefail

cd "$(dirname "$0")/.."
RUN_DIR=.run
PID_FILE=$RUN_DIR/dev.pid
LOG_FILE=$RUN_DIR/dev.log
PORT=${PORT:-8000}
URL="http://127.0.0.1:$PORT"

running() {
  [ -f "$PID_FILE" ] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null
}

start() {
  if running; then
    echo "already running (pid $(cat "$PID_FILE")) at $URL"
    return
  fi
  mkdir -p "$RUN_DIR"
  cargo build --release --quiet
  PORT=$PORT setsid target/release/stagecraft dev >"$LOG_FILE" 2>&1 &
  echo $! >"$PID_FILE"
  for _ in $(seq 1 100); do
    if curl -fsS "$URL/health" >/dev/null 2>&1; then
      echo "Started at $URL (log: $LOG_FILE)"
      return
    fi
    if ! running; then
      echo "stagecraft exited; its log says:" >&2
      tail -n 20 "$LOG_FILE" >&2
      exit 1
    fi
    sleep 0.1
  done
  echo "no answer from $URL/health after 10 s; see $LOG_FILE" >&2
  exit 1
}

stop() {
  if ! running; then
    echo "not running"
    rm -f "$PID_FILE"
    return
  fi
  local pid
  pid=$(cat "$PID_FILE")
  kill -TERM "$pid"
  for _ in $(seq 1 150); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  if kill -0 "$pid" 2>/dev/null; then
    kill -KILL "$pid"
  fi
  rm -f "$PID_FILE"
  echo "stopped"
}

case "${1:-}" in
  up)
    start
    ;;
  live)
    PROVIDER_MODE=live start
    ;;
  down)
    stop
    ;;
  logs)
    touch "$LOG_FILE" 2>/dev/null || { mkdir -p "$RUN_DIR"; touch "$LOG_FILE"; }
    tail -f "$LOG_FILE"
    ;;
  status)
    if running; then
      echo "running (pid $(cat "$PID_FILE")) at $URL"
      curl -sS "$URL/health"
      echo
    else
      echo "not running"
    fi
    ;;
  shell)
    echo "STAGECRAFT_URL=$URL; try: target/release/stagecraft runs"
    STAGECRAFT_URL=$URL "${SHELL:-bash}"
    ;;
  test)
    make test
    ;;
  *)
    echo "Usage: $0 {up|down|logs|status|shell|test|live}" >&2
    exit 1
    ;;
esac
