#!/usr/bin/env bash
# `make docker-e2e`: the images and the production stack, proven under a real Docker engine.
#
# Builds the development image and the production and work-order images (with the base images
# built locally by scripts/docker-local-base.sh when E2E_LOCAL_BASE=1, the default: no image
# registry needed), brings the production stack up with three workers and the `awo` profile,
# submits a studio `full_production` and a work order, SIGKILLs the worker container running
# the studio run in the middle of `completion`, starts a replacement, and checks that both
# finish, that no finished stage ran again, and that the API serves the final cut (whole and a
# byte range). Then the high-availability stack (docker-compose.ha.yml: two replicas, three
# sentinels, durable acknowledgements): runs submitted, the Redis primary SIGKILLed, and every
# accepted run completes on the replica Sentinel promotes, the API and workers following it.
# Then the production stack on PostgreSQL (the `postgres` profile): runs submitted, a worker
# SIGKILLed and the database restarted, and every accepted run completes.
# Reports each image's size. The stacks are taken down at the end, whatever happens.
#
# Variables: E2E_PORT (18080), E2E_LOCAL_BASE (1), GH_SOURCE (debian: the GitHub CLI from
# Debian's package, no download from GitHub), E2E_KEEP=1 leaves the stack up for a look.
set -euo pipefail
cd "$(dirname "$0")/.."

port=${E2E_PORT:-18080}
project=stagecraft-e2e
work=$(mktemp -d)
token=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
export GH_SOURCE=${GH_SOURCE:-debian}

say() { printf '\n== %s\n' "$*"; }
fail() { echo "docker-e2e: FAILED: $*" >&2; exit 1; }

command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 ||
  fail "docker compose is needed"
docker info >/dev/null 2>&1 || fail "no Docker engine answers (start dockerd)"
for tool in curl git ffprobe python3; do
  command -v "$tool" >/dev/null 2>&1 || fail "$tool is needed on this host"
done
if docker compose version >/dev/null 2>&1; then compose_cmd=(docker compose); else compose_cmd=(docker-compose); fi

cat >"$work/e2e.env" <<EOF
API_TOKEN=$token
PORT=$port
PROVIDER_MODE=mock
AWO_ALLOWED_URL_SCHEMES=https,file
GH_SOURCE=$GH_SOURCE
E2E_REMOTE=$work/remote.git
EOF
compose=("${compose_cmd[@]}" -p "$project" -f docker/docker-compose.prod.yml -f docker/docker-compose.e2e.yml
  --env-file "$work/e2e.env" --profile awo)

ha=("${compose_cmd[@]}" -p "$project-ha" -f docker/docker-compose.prod.yml -f docker/docker-compose.ha.yml
  --env-file "$work/e2e.env")
pg=("${compose_cmd[@]}" -p "$project-pg" -f docker/docker-compose.prod.yml --env-file "$work/pg.env"
  --profile postgres)

cleanup() {
  if [ "${E2E_KEEP:-0}" = 1 ]; then
    echo "the stacks are still up: ${compose[*]} down -v; ${ha[*]} down -v; ${pg[*]} down -v"
  else
    "${compose[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
    "${ha[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
    [ -f "$work/pg.env" ] && { "${pg[@]}" down -v --remove-orphans >/dev/null 2>&1 || true; }
    rm -rf "$work"
  fi
}
trap cleanup EXIT

api() { curl -fsS -H "Authorization: Bearer $token" "$@"; }
field() { python3 -c 'import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1], {"d": d}))' "$1"; }

if [ "${E2E_LOCAL_BASE:-1}" = 1 ]; then
  say "base images (local)"
  scripts/docker-local-base.sh
fi

say "development image"
start=$(date +%s)
docker build -q -f docker/Dockerfile -t stagecraft-dev:e2e . >/dev/null
echo "built in $(($(date +%s) - start)) s"

say "production and work-order images"
start=$(date +%s)
"${compose[@]}" build api awo-worker
echo "built in $(($(date +%s) - start)) s"
for image in stagecraft-dev:e2e stagecraft:0.1.0 stagecraft-awo:0.1.0; do
  size=$(docker image inspect --format '{{.Size}}' "$image")
  printf '%-24s %6d MB\n' "$image" $((size / 1000000))
done

say "a bare remote for the work order"
git init -q --bare "$work/remote.git"
git clone -q "$work/remote.git" "$work/seed"
git -C "$work/seed" -c user.name=e2e -c user.email=e2e@localhost commit -q --allow-empty -m "initial commit"
printf '# e2e\n' >"$work/seed/README.md"
git -C "$work/seed" add README.md
git -C "$work/seed" -c user.name=e2e -c user.email=e2e@localhost commit -q -m "readme"
git -C "$work/seed" push -q origin HEAD:main
git -C "$work/remote.git" symbolic-ref HEAD refs/heads/main
chmod -R a+rwX "$work/remote.git"

say "the production stack: three workers and the work-order worker"
"${compose[@]}" up -d --scale worker=3
for _ in $(seq 1 120); do
  curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
  sleep 1
done
curl -fsS "http://127.0.0.1:$port/health" >/dev/null || fail "the API never answered /health"

say "a studio run and a work order"
run=$(api -X POST "http://127.0.0.1:$port/workflows/full_production/run" -H 'content-type: application/json' \
  -d '{"inputs": {"user_request": "Trains at dawn", "total_budget": 50.0, "num_pilots": 1, "target_duration_secs": 12, "num_scenes": 6}, "async": true}' |
  field 'd["run_id"]')
order=$(api -X POST "http://127.0.0.1:$port/agent-work-orders" -H 'content-type: application/json' \
  -d '{"repository_url": "file:///srv/e2e/remote.git", "sandbox_type": "git_branch", "workflow_type": "agent_workflow_plan", "user_request": "Add a greeting"}' |
  field 'd["agent_work_order_id"]')
echo "studio run $run, work order $order"

say "kill the worker running the studio run in the middle of completion"
victim=""
for _ in $(seq 1 300); do
  doc=$(api "http://127.0.0.1:$port/runs/$run")
  done_scenes=$(echo "$doc" | field '[s for s in d["stages"] if s["name"] == "completion"][0].get("progress", {}).get("done", 0) or 0')
  if [ "$done_scenes" -ge 2 ]; then
    # A worker id is host:pid:role…; a container's host name is its short id.
    host=$(echo "$doc" | field '(d.get("worker") or "").split(":")[0]')
    victim=$(docker ps -q --filter "label=com.docker.compose.project=$project" \
      --filter "label=com.docker.compose.service=worker" | grep "^$host" || true)
    [ -n "$victim" ] && break
  fi
  sleep 0.5
done
[ -n "$victim" ] || fail "never saw the studio run in completion on a worker container"
docker kill --signal KILL "$victim" >/dev/null
echo "killed worker container $victim after $done_scenes scenes"
"${compose[@]}" up -d --no-recreate --scale worker=3 worker >/dev/null 2>&1
echo "a replacement worker started"

say "both finish"
for _ in $(seq 1 600); do
  run_status=$(api "http://127.0.0.1:$port/runs/$run" | field 'd["status"]')
  order_status=$(api "http://127.0.0.1:$port/agent-work-orders/$order" | field 'd["status"]')
  case "$run_status/$order_status" in
    completed/completed) break ;;
    failed/* | cancelled/* | */failed | */cancelled) break ;;
  esac
  sleep 1
done
echo "studio run: $run_status, work order: $order_status"
[ "$run_status" = completed ] || fail "the studio run ended $run_status: $(api "http://127.0.0.1:$port/runs/$run")"
[ "$order_status" = completed ] || fail "the work order ended $order_status: $(api "http://127.0.0.1:$port/agent-work-orders/$order")"

doc=$(api "http://127.0.0.1:$port/runs/$run")
attempts=$(echo "$doc" | field '" ".join("%s=%s" % (s["name"], s["attempts"]) for s in d["stages"])')
echo "stage attempts: $attempts"
for stage in planning pilots evaluation; do
  echo "$attempts" | grep -q "$stage=1" || fail "$stage ran again after the kill: $attempts"
done
echo "$attempts" | grep -q "completion=2" || fail "completion should have run twice (killed once): $attempts"

say "the final cut, served by the API"
api -o "$work/final.mp4" "http://127.0.0.1:$port/artifacts/runs/$run/final/final.mp4"
duration=$(ffprobe -v error -show_entries format=duration -of csv=p=0 "$work/final.mp4")
echo "final cut: $(stat -c %s "$work/final.mp4") bytes, $duration s"
python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) > 10 else 1)" "$duration" || fail "the final cut is $duration s"
status=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $token" -H 'Range: bytes=0-99' \
  "http://127.0.0.1:$port/artifacts/runs/$run/final/final.mp4")
[ "$status" = 206 ] || fail "a range of the final cut answered $status"
branch=$(git -C "$work/remote.git" branch --list "wo-$order" | tr -d ' *')
[ -n "$branch" ] || fail "the work order pushed no branch wo-$order"
echo "work order pushed $branch to the remote"

say "high availability: the Redis primary killed under load"
"${compose[@]}" down -v --remove-orphans >/dev/null 2>&1
"${ha[@]}" up -d --scale worker=2 >/dev/null 2>&1
for _ in $(seq 1 120); do
  curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
  sleep 1
done
submit_demo() {
  # One run, retried with its idempotency key until accepted; answers its id.
  for _ in $(seq 1 120); do
    if answer=$(api -X POST "http://127.0.0.1:$port/runs" -H 'content-type: application/json' \
      -H "Idempotency-Key: e2e-ha-$1" -d '{"kind": "workflow", "name": "demo", "inputs": {"sleep_ms": 300}}' 2>/dev/null); then
      echo "$answer" | field 'd["run_id"]'
      return 0
    fi
    sleep 0.5
  done
  return 1
}
uncompleted() {
  # Waits up to two minutes for these runs to complete; answers how many did not.
  local left
  for _ in $(seq 1 120); do
    left=0
    for id in "$@"; do
      [ "$(api "http://127.0.0.1:$port/runs/$id" | field 'd["status"]')" = completed ] || left=$((left + 1))
    done
    [ "$left" -eq 0 ] && break
    sleep 1
  done
  echo "$left"
}
ids=()
for i in $(seq 1 20); do
  id=$(submit_demo "$i") || fail "run $i was never accepted: $(curl -s "http://127.0.0.1:$port/health")"
  ids+=("$id")
done
primary=$(docker ps -q --filter "label=com.docker.compose.project=$project-ha" --filter "label=com.docker.compose.service=redis")
docker kill --signal KILL "$primary" >/dev/null
echo "killed the Redis primary ($primary) with ${#ids[@]} runs accepted"
for i in $(seq 21 40); do
  id=$(submit_demo "$i") || fail "run $i was never accepted after the failover: $(curl -s "http://127.0.0.1:$port/health")"
  ids+=("$id")
done
echo "${#ids[@]} runs accepted in all"
pending=$(uncompleted "${ids[@]}")
[ "$pending" -eq 0 ] || fail "$pending accepted runs did not complete after the failover"
followed=$("${ha[@]}" logs api worker 2>&1 | grep -c "following the new Redis primary" || true)
[ "$followed" -ge 3 ] || fail "the API and both workers should have followed the new primary ($followed did)"
echo "every accepted run completed; $followed processes followed the new primary"

say "PostgreSQL: the production stack on the postgres profile, a worker and the database restarted"
"${ha[@]}" down -v --remove-orphans >/dev/null 2>&1
pgpass=$(head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n')
cat "$work/e2e.env" >"$work/pg.env"
cat >>"$work/pg.env" <<EOF
QUEUE_BACKEND=postgres
POSTGRES_PASSWORD=$pgpass
DATABASE_URL=postgres://stagecraft:$pgpass@postgres:5432/stagecraft
EOF
"${pg[@]}" up -d --scale worker=2 >/dev/null 2>&1
for _ in $(seq 1 120); do
  curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
  sleep 1
done
backend=$(curl -fsS "http://127.0.0.1:$port/health" | field 'd["backend"]') || fail "the API on PostgreSQL never answered /health"
[ "$backend" = postgres ] || fail "/health names the backend $backend"
ids=()
for i in $(seq 1 20); do
  id=$(submit_demo "pg-$i") || fail "run pg-$i was never accepted"
  ids+=("$id")
done
worker=$(docker ps -q --filter "label=com.docker.compose.project=$project-pg" --filter "label=com.docker.compose.service=worker" | head -n 1)
docker kill --signal KILL "$worker" >/dev/null
database=$(docker ps -q --filter "label=com.docker.compose.project=$project-pg" --filter "label=com.docker.compose.service=postgres")
docker restart "$database" >/dev/null
echo "killed a worker ($worker) and restarted the database with ${#ids[@]} runs accepted"
"${pg[@]}" up -d --no-recreate --scale worker=2 worker >/dev/null 2>&1
for i in $(seq 21 40); do
  id=$(submit_demo "pg-$i") || fail "run pg-$i was never accepted after the restart: $(curl -s "http://127.0.0.1:$port/health")"
  ids+=("$id")
done
pending=$(uncompleted "${ids[@]}")
[ "$pending" -eq 0 ] || fail "$pending accepted runs did not complete on PostgreSQL"
echo "every one of the ${#ids[@]} accepted runs completed on PostgreSQL"

say "docker-e2e passed"
