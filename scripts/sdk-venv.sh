#!/usr/bin/env bash
# Creates (once) the Python venv that runs the SDK integration tests in tests/sdk:
# target/sdk-venv with the exact pins of tests/sdk/requirements.txt. A stamp file
# holding those requirements makes a re-run with unchanged pins instant. The last
# line printed on stdout is the venv's python.
#
#   scripts/sdk-venv.sh && target/sdk-venv/bin/python -m pytest tests/sdk -q
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/sdk-venv
req=tests/sdk/requirements.txt
stamp="$venv/.brise-requirements"
py="$venv/bin/python"

command -v python3 >/dev/null 2>&1 || { echo "error: python3 is required" >&2; exit 1; }

if [[ -x "$py" && -f "$stamp" ]] && cmp -s "$req" "$stamp" && "$py" -c 'import sys' 2>/dev/null; then
    echo "$PWD/$py"
    exit 0
fi

if ! "$py" -c 'import sys' >/dev/null 2>&1; then
    rm -rf "$venv"
    mkdir -p target
    python3 -m venv "$venv" >&2
fi
rm -f "$stamp"
"$py" -m pip install --disable-pip-version-check -q -r "$req" >&2
cp "$req" "$stamp"
echo "$PWD/$py"
