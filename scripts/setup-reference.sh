#!/usr/bin/env bash
# Create/refresh the Python environment used ONLY to regenerate reference
# fixtures (scripts/ref/*.py -> tests/fixtures/). CI does not run this.
#
# Idempotent: packages already installed at the pinned version are left alone,
# and llama-cpp-python is only rebuilt when its version or build flags differ.
#
#   BRISE_VENV   venv directory (default: .venv, relative to the repo root)
#   PYTHON       interpreter used to create the venv (default: python3, needs 3.10+)
#   FORCE_LLAMA_REBUILD=1   rebuild llama-cpp-python even if it looks up to date
set -euo pipefail

cd "$(dirname "$0")/.."
VENV="${BRISE_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

LLAMA_CPP_PYTHON_VERSION=0.3.36
# AVX-512 on, AMX off (AMX kernels crash on the reference machine), no native tuning
# so results do not depend on the build host.
LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"

PINNED=(
  "gguf==0.19.0"
  "mistral-common==1.13.1"
  "numpy==2.3.5"
  "sentencepiece==0.2.3"
  "safetensors==0.8.0"
  "Jinja2==3.1.6"
  "protobuf==7.36.2"   # sentencepiece_model_pb2 (SentencePiece model proto) in gen_mistral_tok.py
  "sacrebleu==2.6.0"   # chrF, the learning gate's closeness metric (gen_chrf.py)
)

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "creating venv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip --version >/dev/null

installed_version() {  # distribution name -> installed version or empty
  "$PY" - "$1" <<'EOF'
import sys, importlib.metadata as md
try:
    print(md.version(sys.argv[1]))
except md.PackageNotFoundError:
    pass
EOF
}

missing=()
for spec in "${PINNED[@]}"; do
  name="${spec%%==*}"
  want="${spec##*==}"
  have="$(installed_version "$name")"
  if [[ "$have" != "$want" ]]; then
    missing+=("$spec")
  fi
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  "$PY" -m pip install "${missing[@]}"
else
  echo "pinned packages already installed"
fi

# ---- llama-cpp-python, built from source with fixed flags
MARKER="$VENV/.brise-llama-cpp-python-build"
WANT_MARKER="$LLAMA_CPP_PYTHON_VERSION $LLAMA_CMAKE_ARGS"
have_llama="$(installed_version llama_cpp_python)"

build_flags_look_right() {
  # no marker (e.g. built by hand before this script existed): check what ggml reports
  "$PY" - <<'EOF'
import sys, llama_cpp
info = llama_cpp.llama_print_system_info().decode()
ok = "AVX512 = 1" in info and "AMX" not in info and "AVX512_BF16" not in info
print(info.strip(), file=sys.stderr)
sys.exit(0 if ok else 1)
EOF
}

need_build=1
if [[ "${FORCE_LLAMA_REBUILD:-0}" != 1 && "$have_llama" == "$LLAMA_CPP_PYTHON_VERSION" ]]; then
  if [[ -f "$MARKER" && "$(cat "$MARKER")" == "$WANT_MARKER" ]]; then
    need_build=0
  elif [[ ! -f "$MARKER" ]] && build_flags_look_right; then
    echo "$WANT_MARKER" > "$MARKER"
    need_build=0
  fi
fi

if ((need_build)); then
  echo "building llama-cpp-python $LLAMA_CPP_PYTHON_VERSION from source (this takes a while)"
  # --no-deps so a forced rebuild never touches the pinned packages above;
  # the second call then only adds llama-cpp-python's missing dependencies.
  CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL=2 \
    "$PY" -m pip install --force-reinstall --no-deps --no-cache-dir --no-binary llama-cpp-python \
    "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
  "$PY" -m pip install "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" "${PINNED[@]}"
  echo "$WANT_MARKER" > "$MARKER"
else
  echo "llama-cpp-python $LLAMA_CPP_PYTHON_VERSION already built with the expected flags"
fi

"$PY" - <<'EOF'
import importlib.metadata as md
for p in ["llama_cpp_python", "gguf", "mistral_common", "numpy", "sentencepiece", "safetensors", "Jinja2", "protobuf"]:
    print(f"{p:18s} {md.version(p)}")
EOF
echo "reference venv ready: $VENV  (see scripts/ref/README.md)"
