#!/usr/bin/env bash
# Makes sure the system packages the test suite needs are present. Installs the missing ones
# with apt-get when running as root on Debian or Ubuntu; otherwise says exactly what to install.
set -euo pipefail
cd "$(dirname "$0")/.."

# command -> Debian package
declare -A needed=(
  [redis-server]=redis-server
  [redis-cli]=redis-tools
  # The failover tests run a primary, replicas and three sentinels.
  [redis-sentinel]=redis-sentinel
  [ffmpeg]=ffmpeg
  [ffprobe]=ffmpeg
  [git]=git
  [docker-compose]=docker-compose
  [shellcheck]=shellcheck
  [python3]=python3
  # The console's tests drive a headless Chromium over WebDriver.
  [chromium]=chromium
  [chromedriver]=chromium-driver
  # The PostgreSQL store is tested behind a transaction-mode pooler too.
  [pgbouncer]=pgbouncer
  # The TLS test of the PostgreSQL store makes a CA and a server certificate.
  [openssl]=openssl
)

missing=()
for command in "${!needed[@]}"; do
  command -v "$command" >/dev/null 2>&1 || missing+=("${needed[$command]}")
done
# The mock video provider draws each scene's text: ffmpeg needs at least one font.
if ! ls /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf >/dev/null 2>&1 \
  && ! { command -v fc-list >/dev/null 2>&1 && [ -n "$(fc-list 2>/dev/null | head -1)" ]; }; then
  missing+=(fonts-dejavu-core)
fi
# The PostgreSQL store's tests start a real server (Debian keeps initdb and postgres off PATH).
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  missing+=(postgresql)
fi
# The fuzz pass runs schemathesis in a virtual environment.
if command -v python3 >/dev/null 2>&1 && ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  missing+=(python3-venv)
fi
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u | sed '/^$/d')

install_coding_agent() {
  # The real coding-agent CLI, pinned, for the test that checks the flags Stagecraft gives it
  # and how a run without credentials fails. Without npm that test says it was skipped.
  local version=2.1.332 dir=target/claude-cli
  if ! command -v npm >/dev/null 2>&1; then
    echo "npm not found: the test of the real coding-agent CLI will be skipped (apt-get install nodejs npm)"
    return 0
  fi
  if grep -qs "\"version\": \"$version\"" "$dir/node_modules/@anthropic-ai/claude-code/package.json"; then
    return 0
  fi
  echo "installing the coding-agent CLI $version into $dir"
  npm install --prefix "$dir" --no-audit --no-fund --no-save --loglevel=error \
    "@anthropic-ai/claude-code@$version" ||
    echo "could not install the coding-agent CLI; the test that runs it will say so"
}

install_s3_server() {
  # A real S3-compatible server for the object-storage tests, built from the Rust crate
  # registry (pinned: the newest release needs a newer compiler than the project's).
  local version=0.14.1 root=target/tools
  if "$root/bin/s3s-fs" --version 2>/dev/null | grep -q "$version"; then
    return 0
  fi
  echo "installing the S3-compatible test server s3s-fs $version into $root"
  CARGO_TARGET_DIR=target/tools-build cargo install --quiet --locked --root "$root" \
    --features binary "s3s-fs@$version"
  rm -rf target/tools-build
}

install_s3_server

if [ "${#missing[@]}" -eq 0 ]; then
  install_coding_agent
  exit 0
fi

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing test dependencies: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  install_coding_agent
  exit 0
fi

echo "The tests need these packages: ${missing[*]}" >&2
echo "Install them with: sudo apt-get install ${missing[*]}" >&2
exit 1
