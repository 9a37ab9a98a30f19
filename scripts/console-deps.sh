#!/usr/bin/env bash
# Installs (once) what the console's browser tests in tests/console need: Debian's
# chromium (when /usr/bin/chromium is missing; needs root or sudo), Node.js and npm
# (likewise, from Debian), and the pinned playwright-core of tests/console/package-lock.json
# in target/console-node (npm ci checks each package's integrity). A copy of the lock
# file as a stamp makes a re-run with unchanged pins instant.
#
#   scripts/console-deps.sh && node --test tests/console/
set -euo pipefail
cd "$(dirname "$0")/.."

apt_install() {
    local sudo=()
    [[ "$(id -u)" == 0 ]] || sudo=(sudo)
    "${sudo[@]}" apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "$@" >&2
}

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    apt_install nodejs npm
fi
if [[ ! -x /usr/bin/chromium ]]; then
    apt_install chromium
fi

dir=target/console-node
stamp="$dir/.brise-package-lock.json"
if [[ -f "$stamp" && -d "$dir/node_modules/playwright-core" ]] && cmp -s tests/console/package-lock.json "$stamp"; then
    exit 0
fi
mkdir -p "$dir"
cp tests/console/package.json tests/console/package-lock.json "$dir/"
# playwright-core downloads no browser; the tests drive Debian's chromium.
(cd "$dir" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >&2)
cp tests/console/package-lock.json "$stamp"
