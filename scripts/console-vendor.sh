#!/usr/bin/env bash
# Vendors the web console's libraries: fetches each pinned npm package with `npm pack`,
# checks the tarball against the integrity (sha512) pinned below, and copies its dist
# file and license into crates/brise-server/console/vendor/, with SHA256SUMS of the
# copies (a Rust test checks the embedded files against them). The result is committed,
# so `cargo build` needs neither npm nor a network; run this only to change a version
# (then update the file names in crates/brise-server/src/console.rs and index.html).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v npm >/dev/null 2>&1 || { echo "error: npm is required to vendor the console's libraries" >&2; exit 1; }

# package version integrity file-in-package vendored-name license-in-package vendored-license
PINS=(
  "marked 18.2.1 sha512-ii4bxCTCqqwpT86XZWgJNs+ZnAIZksmLGYMViWA7PDIXYIeNo1x6cDdX3JOip9NM/cI6p8z57FxliACboTruMA== lib/marked.umd.js marked-18.2.1.umd.js LICENSE LICENSE-marked.txt"
  # DOMPurify is Apache-2.0 or MPL-2.0; brise takes it under Apache-2.0, its own license.
  "dompurify 3.4.18 sha512-ofe3wI/uNm68HInABYFJYqQxRw1EaKAjNdrFVKqjUY+UZurvNd2L/HuQe097s/4RivWiZyP6tT7aoT8atjfhwg== dist/purify.min.js purify-3.4.18.min.js LICENSE LICENSE-dompurify.txt"
  "chart.js 4.6.1 sha512-hJyniucsFmq//EvXYvJ6c6mahPoI3kaxdjVH8awTaJ/fDNWeSqqqArixMJWkWNN6fcYvPU3HneSANFNYtRi61g== dist/chart.umd.min.js chart-4.6.1.umd.min.js LICENSE.md LICENSE-chartjs.txt"
)

out=crates/brise-server/console/vendor
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$out"
: >"$tmp/SHA256SUMS"
for pin in "${PINS[@]}"; do
  read -r name version integrity file vname license vlicense <<<"$pin"
  (cd "$tmp" && npm pack --silent "$name@$version" >/dev/null)
  tgz="$(ls "$tmp"/*.tgz)"
  # npm's integrity is sha512 of the tarball, base64.
  got="sha512-$(openssl dgst -sha512 -binary "$tgz" | base64 -w0)"
  if [[ "$got" != "$integrity" ]]; then
    echo "error: $name@$version: integrity $got, pinned $integrity" >&2
    exit 1
  fi
  mkdir "$tmp/pkg"
  tar -xzf "$tgz" -C "$tmp/pkg"
  cp "$tmp/pkg/package/$file" "$out/$vname"
  cp "$tmp/pkg/package/$license" "$out/$vlicense"
  (cd "$out" && sha256sum "$vname" "$vlicense") >>"$tmp/SHA256SUMS"
  rm -rf "$tmp/pkg" "$tgz"
  echo "vendored $name@$version -> $out/$vname"
done
cp "$tmp/SHA256SUMS" "$out/SHA256SUMS"
