#!/bin/sh
# Container entry point: wait for the store (Redis may start after us), bring its schema up to
# date, then run the given role (serve, worker, dev, or any other stagecraft subcommand).
set -eu

role="${1:-serve}"
case "$role" in
  serve|worker|dev)
    # `migrate` fails while the store cannot be reached: retry for up to a minute.
    # Several containers may start at once; migrations are safe to run concurrently.
    tries=0
    until stagecraft migrate; do
      tries=$((tries + 1))
      if [ "$tries" -ge 60 ]; then
        echo "entrypoint: the store is still unreachable after 60 s; giving up" >&2
        exit 1
      fi
      echo "entrypoint: waiting for the store ($tries)" >&2
      sleep 1
    done
    ;;
esac
exec stagecraft "$@"
