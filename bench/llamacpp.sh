#!/usr/bin/env bash
# Fetch and build llama.cpp's llama-bench, the reference brise is compared with.
#
# The reference is the llama.cpp vendored in the llama-cpp-python sdist (pinned
# below), fetched with pip, so it needs nothing but the Python package index.
# The build is cached under bench/out/llamacpp/<version>-<flags hash>/, so a
# rerun with the same version and flags only prints the path. On success the
# absolute path of the llama-bench binary is the only thing written to stdout;
# progress goes to stderr and the full build log to <cache dir>/build.log.
#
#   BRISE_BENCH_OUT   cache root (default: <repo>/bench/out)
#   BUILD_JOBS        parallel compile jobs (default: 2)
#   FORCE_REBUILD=1   rebuild even if the cached binary looks up to date
#   LLAMA_TARGET      llama-bench (default) or llama-server (for bench/serve_compare.py)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${BRISE_BENCH_OUT:-$ROOT/bench/out}"
JOBS="${BUILD_JOBS:-2}"

LLAMA_CPP_PYTHON_VERSION=0.3.36
# Same CPU flags as scripts/setup-reference.sh: AVX-512 (+VNNI, VBMI) on, AMX off
# (llama.cpp's AMX path crashes on the reference machine), no -march=native so
# the binary does not depend on the build host.
GGML_FLAGS=(
  -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
  -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_BF16=OFF
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
)
# Build only what llama-bench needs. LLAMA_CURL is deprecated (ignored) in this
# version but passed anyway; LLAMA_OPENSSL=OFF avoids an optional libssl
# dependency of the HTTP client that llama-bench never uses.
LLAMA_FLAGS=(
  -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
  -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TOOLS=ON
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
  -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF
)
TARGET="${LLAMA_TARGET:-llama-bench}"
case "$TARGET" in
  llama-bench) ;;
  llama-server) LLAMA_FLAGS=("${LLAMA_FLAGS[@]/-DLLAMA_BUILD_SERVER=OFF/-DLLAMA_BUILD_SERVER=ON}") ;;
  *) echo "llamacpp.sh: LLAMA_TARGET must be llama-bench or llama-server" >&2; exit 2 ;;
esac
FLAGS="${GGML_FLAGS[*]} ${LLAMA_FLAGS[*]}"
KEY="$LLAMA_CPP_PYTHON_VERSION-$(printf '%s' "$FLAGS" | sha256sum | cut -c1-12)"
DIR="$OUT/llamacpp/$KEY"
BIN="$DIR/build/bin/$TARGET"
STAMP="$DIR/.built"

log() { echo "llamacpp.sh: $*" >&2; }

if [[ -z "${FORCE_REBUILD:-}" && -x "$BIN" && -f "$STAMP" && "$(cat "$STAMP")" == "$LLAMA_CPP_PYTHON_VERSION $FLAGS" ]]; then
  echo "$BIN"
  exit 0
fi
mkdir -p "$DIR"

# ---- source: the llama-cpp-python sdist, which vendors llama.cpp
SRC="$DIR/src/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"
if [[ ! -f "$SRC/tools/llama-bench/llama-bench.cpp" ]]; then
  SDIST_DIR="$OUT/llamacpp/sdist"
  TARBALL="$SDIST_DIR/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
  if [[ ! -f "$TARBALL" ]]; then
    log "downloading llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist"
    mkdir -p "$SDIST_DIR"
    # --no-binary for this package only: ':all:' makes pip resolve (and hang on) build deps
    python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python \
      "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$SDIST_DIR" >&2
  fi
  [[ -f "$TARBALL" ]] || { log "expected $TARBALL after pip download"; exit 1; }
  log "unpacking $(basename "$TARBALL")"
  rm -rf "$DIR/src"
  mkdir -p "$DIR/src"
  tar -xzf "$TARBALL" -C "$DIR/src"
fi

# ---- cmake: Debian's if present, else pip's in a private venv
CMAKE="$(command -v cmake || true)"
if [[ -z "$CMAKE" ]] || ! "$CMAKE" --version >/dev/null 2>&1; then
  VENV="$OUT/cmake-venv"
  if [[ ! -x "$VENV/bin/cmake" ]]; then
    log "no cmake on PATH: installing it with pip into $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet cmake >&2
  fi
  CMAKE="$VENV/bin/cmake"
fi
log "using $("$CMAKE" --version | head -1)"

# ---- configure + build the one target
rm -f "$STAMP"
log "configuring ($FLAGS)"
start=$(date +%s)
{
  "$CMAKE" -S "$SRC" -B "$DIR/build" "${GGML_FLAGS[@]}" "${LLAMA_FLAGS[@]}"
  "$CMAKE" --build "$DIR/build" --target "$TARGET" -j "$JOBS"
} >"$DIR/build.log" 2>&1 || { log "build failed; last lines of $DIR/build.log:"; tail -30 "$DIR/build.log" >&2; exit 1; }
[[ -x "$BIN" ]] || { log "build finished but $BIN is missing"; exit 1; }
log "built in $(( $(date +%s) - start )) s"
echo "$LLAMA_CPP_PYTHON_VERSION $FLAGS" >"$STAMP"
echo "$BIN"
