#!/usr/bin/env bash
# A private PostgreSQL server for brise's tests: installs Debian's postgresql package when
# no server is installed, creates a throwaway cluster in $TMPDIR (trust auth, loopback
# only, its own port), and prints the server's URL on the last line. The cluster lives
# outside the repo: as root the server runs as the `postgres` user, which may not be
# able to enter the checkout's directories.
#
#   scripts/postgres.sh start    # idempotent; prints postgres://postgres@127.0.0.1:PORT
#   scripts/postgres.sh stop
#
#   BRISE_PG_PORT   port (default 54329)
set -euo pipefail
cd "$(dirname "$0")/.."
PORT="${BRISE_PG_PORT:-54329}"
DIR="${TMPDIR:-/tmp}/brise-pg-$PORT"
URL="postgres://postgres@127.0.0.1:$PORT"

# The newest installed server's binaries (the client package has a bin/ too, without initdb).
bindir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | while read -r d; do [[ -x "$d/initdb" ]] && echo "$d"; done | tail -n 1; }

# Runs a server binary as the cluster's owner: PostgreSQL refuses to run as root.
as_owner() {
  if [[ $(id -u) -eq 0 ]]; then
    su postgres -s /bin/sh -c "$(printf '%q ' "$@")"
  else
    "$@"
  fi
}

case "${1:-start}" in
  start)
    if [[ -z "$(bindir)" ]]; then
      command -v apt-get >/dev/null || { echo "error: PostgreSQL is not installed, and there is no apt-get to install it" >&2; exit 1; }
      echo "installing PostgreSQL (Debian's postgresql package)" >&2
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2 \
        || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2; }
    fi
    BIN="$(bindir)"
    if [[ ! -f "$DIR/PG_VERSION" ]]; then
      rm -rf "$DIR"
      mkdir -p "$DIR"
      [[ $(id -u) -eq 0 ]] && chown postgres "$DIR"
      as_owner "$BIN/initdb" -D "$DIR" -U postgres -A trust -E UTF8 --no-instructions >&2
    fi
    if ! as_owner "$BIN/pg_ctl" -D "$DIR" status >/dev/null 2>&1; then
      as_owner "$BIN/pg_ctl" -D "$DIR" -l "$DIR/server.log" -w -t 60 \
        -o "-p $PORT -k $DIR -c listen_addresses=127.0.0.1 -c fsync=on -c max_connections=200" start >&2
    fi
    echo "$URL"
    ;;
  stop)
    BIN="$(bindir)"
    if [[ -n "$BIN" && -f "$DIR/PG_VERSION" ]]; then
      as_owner "$BIN/pg_ctl" -D "$DIR" -m fast -w stop >&2 || true
    fi
    ;;
  *)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
