#!/usr/bin/env bash
# Create or reuse ./.venv and install dynamicvit with every extra and the test tools. Sourced by demo.sh and test.sh.
# Also installs the Fashion-MNIST files (Debian package dataset-fashion-mnist) when run as root.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DYNAMICVIT_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "dynamicvit needs Python 3.10 or newer; set PYTHON=/path/to/python3.x" >&2
    exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtual environment $VENV"
    "$PY" -m venv "$VENV" || { echo "[setup] python3 -m venv failed: apt-get install -y python3-venv" >&2; exit 1; }
fi
# Reinstall only when the project's dependencies changed.
STAMP="$VENV/.dynamicvit-installed"
WANT="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "[setup] installing dynamicvit and its dependencies into $VENV (first run takes a few minutes)"
    "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
    "$VENV/bin/python" -m pip install -q -e "$ROOT[all,test]" 2>&1 | grep -v "is ignored" || true
    "$VENV/bin/python" -c "import dynamicvit, timm, torch, torchvision, onnxruntime, matplotlib, transformers" \
        || { echo "[setup] install failed" >&2; exit 1; }
    echo "$WANT" > "$STAMP"
fi

FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST/t10k-images-idx3-ubyte.gz" ] && [ "${DYNAMICVIT_SKIP_APT:-0}" != 1 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "[setup] installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
        (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
            || echo "[setup] could not install dataset-fashion-mnist; the demo will explain how to get the data" >&2
    else
        echo "[setup] Fashion-MNIST not found in $FMNIST: run 'sudo apt-get install dataset-fashion-mnist'" \
             "or pass --data DIR (the demo can also download it when online)" >&2
    fi
fi
