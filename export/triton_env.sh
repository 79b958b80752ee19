#!/usr/bin/env bash
# Create .venv-triton: an isolated environment holding a real Triton Inference Server.
#
# The `tritonserver` binary ships inside the nvidia-pytriton wheel; that wheel pins numpy<2, which the
# project's own .venv cannot accept, so it lives in its own venv. onnxruntime is added because the
# integration test's Python-backend model runs the exported ONNX graph with it inside the server's stub.
#
# Usage: export/triton_env.sh [VENV_DIR]   (default .venv-triton; PYTHON selects the interpreter)
# Idempotent: a stamp file records a completed install; delete the folder to rebuild.
set -euo pipefail

VENV_DIR="${1:-.venv-triton}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV_DIR/.triton-stamp"
PACKAGES=("nvidia-pytriton==0.7.0" "onnxruntime>=1.18,<2" "numpy<2")

if [ -f "$STAMP" ] && [ -x "$VENV_DIR/bin/python" ]; then
    exit 0
fi
test -x "$VENV_DIR/bin/python" || "$PYTHON" -m venv "$VENV_DIR"
"$VENV_DIR/bin/python" -m pip install --quiet --upgrade pip
"$VENV_DIR/bin/python" -m pip install --quiet "${PACKAGES[@]}"
# Fail here (not in a test) if the wheel layout changed and the server binary is gone.
"$VENV_DIR/bin/python" - <<'PY'
import pathlib, pytriton
root = pathlib.Path(pytriton.__file__).parent
hits = [p for p in root.rglob("tritonserver") if p.is_file()]
if not hits:
    raise SystemExit(f"no tritonserver binary under {root}")
print(f"tritonserver: {hits[0]}")
PY
touch "$STAMP"
