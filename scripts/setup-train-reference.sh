#!/usr/bin/env bash
# Create/refresh the Python environment used ONLY to regenerate the LoRA reference
# fixtures (scripts/ref/gen_lora.py -> tests/fixtures/lora/) with PyTorch + PEFT, and
# later training references. CI does not run this. Separate from setup-reference.sh's
# venv: torch pulls ~6 GB (it bundles CUDA libraries; everything runs on CPU here).
#
# Idempotent: packages already installed at the pinned version are left alone.
#
#   BRISE_TRAIN_VENV   venv directory (default: .venv-train, relative to the repo root)
#   PYTHON             interpreter used to create the venv (default: python3, needs 3.10+)
set -euo pipefail

cd "$(dirname "$0")/.."
VENV="${BRISE_TRAIN_VENV:-.venv-train}"
PYTHON="${PYTHON:-python3}"

# What pip resolved when the fixtures were made (Python 3.11). accelerate is
# installed with trl; it is pinned too so the environment does not drift.
PINNED=(
  "torch==2.15.0"
  "transformers==5.24.0"
  "peft==0.21.2"
  "trl==1.16.0"
  "accelerate==1.15.0"
  "safetensors==0.8.0"
  "numpy==2.4.6"
  "gguf==0.19.0"
  "sentencepiece==0.2.3"
)

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "creating venv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip --version >/dev/null

installed_version() {  # distribution name -> installed version or empty
  "$PY" - "$1" <<'PYEOF'
import sys, importlib.metadata as md
try:
    print(md.version(sys.argv[1]))
except md.PackageNotFoundError:
    pass
PYEOF
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

"$PY" - <<'PYEOF'
import importlib.metadata as md
for p in ["torch", "transformers", "peft", "trl", "accelerate", "safetensors", "numpy", "gguf", "sentencepiece"]:
    print(f"{p:14s} {md.version(p)}")
PYEOF
echo "training reference venv ready: $VENV  (see scripts/ref/README.md)"
