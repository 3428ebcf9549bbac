#!/usr/bin/env bash
# The compose topology as local processes, for machines without a Docker engine: redis-server
# (AOF on, noeviction), the API, N workers and, with --awo, the work-order worker and the API on
# ARCHON_AWO_PORT. Pid files and logs live under STACK_DIR (default .run/stack, git-ignored).
#
#   scripts/stack.sh up [--awo]       start what is not running yet
#   scripts/stack.sh scale N          run exactly N workers
#   scripts/stack.sh stop             stop every process of the stack
#   scripts/stack.sh status           list the processes
#   scripts/stack.sh logs [NAME]      follow the logs (all, or one process: api, worker-1, awo-worker…)
#   scripts/stack.sh restart NAME     restart one process
#   scripts/stack.sh shell            a shell pointed at the stack (STAGECRAFT_URL, REDIS_URL)
#
# Settings: PORT (8000), ARCHON_AWO_PORT (8888), STACK_REDIS_PORT (6380), N (2 workers),
# STACK_DIR, STAGECRAFT_BIN (default target/release/stagecraft, built when missing); the
# processes read .env like any stagecraft process.
set -euo pipefail

cd "$(dirname "$0")/.."
STACK_DIR=${STACK_DIR:-.run/stack}
PORT=${PORT:-8000}
AWO_PORT=${ARCHON_AWO_PORT:-8888}
REDIS_PORT=${STACK_REDIS_PORT:-6380}
BIN=${STAGECRAFT_BIN:-target/release/stagecraft}
REDIS_URL_LOCAL="redis://127.0.0.1:$REDIS_PORT/0"

say() { echo "stack (local processes): $*"; }

pid_of() { cat "$STACK_DIR/$1.pid" 2>/dev/null || true; }

alive() {
  local pid
  pid=$(pid_of "$1")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

binary() {
  if [ ! -x "$BIN" ]; then
    say "building $BIN"
    cargo build --release --quiet
  fi
}

# start NAME COMMAND...: runs it in its own session with the stack's environment.
start() {
  local name=$1
  shift
  if alive "$name"; then
    return
  fi
  mkdir -p "$STACK_DIR"
  QUEUE_BACKEND=redis REDIS_URL=$REDIS_URL_LOCAL setsid "$@" >"$STACK_DIR/$name.log" 2>&1 < /dev/null &
  echo $! >"$STACK_DIR/$name.pid"
  say "started $name (pid $!)"
}

wait_for() {
  local what=$1 check=$2
  for _ in $(seq 1 200); do
    if eval "$check" >/dev/null 2>&1; then
      return
    fi
    sleep 0.1
  done
  echo "stack: $what did not come up; see $STACK_DIR" >&2
  exit 1
}

start_redis() {
  command -v redis-server >/dev/null || { echo "stack: redis-server is missing (apt-get install redis-server)" >&2; exit 1; }
  mkdir -p "$STACK_DIR/redis"
  start redis redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$STACK_DIR/redis" \
    --appendonly yes --maxmemory-policy noeviction --save ""
  wait_for redis "redis-cli -p $REDIS_PORT ping"
}

start_worker() {
  start "worker-$1" "$BIN" worker --queues agents,workflows
}

workers() {
  local name
  for file in "$STACK_DIR"/worker-*.pid; do
    [ -e "$file" ] || continue
    name=$(basename "$file" .pid)
    echo "${name#worker-}"
  done | sort -n
}

up() {
  binary
  start_redis
  PORT=$PORT start api "$BIN" serve
  wait_for api "curl -fsS http://127.0.0.1:$PORT/health"
  local n=${N:-2}
  for i in $(seq 1 "$n"); do
    start_worker "$i"
  done
  if [ "${1:-}" = "--awo" ]; then
    start awo-worker "$BIN" worker --queues work_orders
    PORT=$AWO_PORT start awo-api "$BIN" serve
    wait_for awo-api "curl -fsS http://127.0.0.1:$AWO_PORT/health"
    say "API on http://127.0.0.1:$PORT and http://127.0.0.1:$AWO_PORT; Redis on port $REDIS_PORT"
  else
    say "API on http://127.0.0.1:$PORT; Redis on port $REDIS_PORT"
  fi
}

stop_one() {
  local name=$1 pid
  pid=$(pid_of "$name")
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 150); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      kill -KILL "$pid" 2>/dev/null || true
    fi
    say "stopped $name"
  fi
  rm -f "$STACK_DIR/$name.pid"
}

stop() {
  local name
  # Workers and APIs first, Redis last, so nothing loses its store while stopping.
  for file in "$STACK_DIR"/*.pid; do
    [ -e "$file" ] || continue
    name=$(basename "$file" .pid)
    [ "$name" = redis ] || stop_one "$name"
  done
  stop_one redis
}

scale() {
  local want=$1 i
  case "$want" in ''|*[!0-9]*) echo "usage: $0 scale N" >&2; exit 1 ;; esac
  binary
  alive redis || { echo "stack: not running; start it with make dev-awo" >&2; exit 1; }
  for i in $(seq 1 "$want"); do
    start_worker "$i"
  done
  for i in $(workers); do
    if [ "$i" -gt "$want" ]; then
      stop_one "worker-$i"
    fi
  done
  say "$want worker(s)"
}

status() {
  local name
  for file in "$STACK_DIR"/*.pid; do
    [ -e "$file" ] || { say "nothing running"; return; }
    name=$(basename "$file" .pid)
    if alive "$name"; then echo "$name running (pid $(pid_of "$name"))"; else echo "$name exited"; fi
  done
}

case "${1:-}" in
  up) up "${2:-}" ;;
  stop) stop ;;
  scale) scale "${2:-}" ;;
  status) status ;;
  logs)
    mkdir -p "$STACK_DIR"
    if [ -n "${2:-}" ]; then tail -n 100 -f "$STACK_DIR/$2.log"; else tail -n 20 -f "$STACK_DIR"/*.log; fi
    ;;
  restart)
    [ -n "${2:-}" ] || { echo "usage: $0 restart NAME" >&2; exit 1; }
    stop_one "$2"
    case "$2" in
      awo-worker) start awo-worker "$BIN" worker --queues work_orders ;;
      worker-*) start "$2" "$BIN" worker --queues agents,workflows ;;
      api) PORT=$PORT start api "$BIN" serve ;;
      awo-api) PORT=$AWO_PORT start awo-api "$BIN" serve ;;
      redis) start_redis ;;
      *) echo "stack: no process $2" >&2; exit 1 ;;
    esac
    ;;
  shell)
    say "STAGECRAFT_URL=http://127.0.0.1:$PORT REDIS_URL=$REDIS_URL_LOCAL"
    STAGECRAFT_URL=http://127.0.0.1:$PORT REDIS_URL=$REDIS_URL_LOCAL QUEUE_BACKEND=redis "${SHELL:-bash}"
    ;;
  *)
    echo "Usage: $0 {up [--awo]|scale N|stop|status|logs [NAME]|restart NAME|shell}" >&2
    exit 1
    ;;
esac
