#!/usr/bin/env bash
# brise's first minute: builds brise, fetches the default model on first use, and
# starts `brise serve` with the ledger and learning on. Open the console URL it
# prints: chat, give a thumbs-down with a better answer, and after a few of them
# the server trains a new version, evaluates it, and swaps it in.
#
#   scripts/chat.sh                  # the default model (smollm2)
#   scripts/chat.sh qwen2.5-coder    # another known model; more arguments go to `brise serve`
#   scripts/chat.sh --terminal       # a chat in this terminal instead (`brise run`)
#
# The admin key (promote and roll back versions, retention, erasure in the console's
# Admin view) is kept in $BRISE_HOME/admin-key, made on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null 2>&1 || { echo "error: cargo is required (install Rust with rustup)" >&2; exit 1; }
cargo build --release -p brise-cli
if [ "${1:-}" = "--terminal" ]; then
  shift
  exec ./target/release/brise run "$@"
fi
model=smollm2
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
  model=$1
  shift
fi
home=${BRISE_HOME:-$HOME/.brise}
mkdir -p "$home"
if [ ! -s "$home/admin-key" ]; then
  (umask 077 && od -An -N16 -tx1 /dev/urandom | tr -d ' \n' > "$home/admin-key")
fi
port=${BRISE_PORT:-8080}
echo "brise: the console will be at http://127.0.0.1:$port/ (admin key in $home/admin-key)" >&2
exec ./target/release/brise serve "$model" --port "$port" --admin-key "$(cat "$home/admin-key")" \
  --learn --learn-after 5 --learn-check 5 --learn-threads 1 "$@"
