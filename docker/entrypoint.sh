#!/bin/sh
# Container entry point: bring the store's schema up to date, then run the given role
# (serve, worker, dev, or any other stagecraft subcommand).
set -eu

role="${1:-serve}"
case "$role" in
  serve|worker|dev)
    # Several containers may start at once; migrations are safe to run concurrently.
    stagecraft migrate
    ;;
esac
exec stagecraft "$@"
