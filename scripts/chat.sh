#!/usr/bin/env bash
# Builds brise and starts a chat with the default model (fetched on first use).
# Extra arguments go to `brise run`, e.g. scripts/chat.sh qwen2.5-coder
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null 2>&1 || { echo "error: cargo is required (install Rust with rustup)" >&2; exit 1; }
cargo build --release -p brise-cli
exec ./target/release/brise run "$@"
