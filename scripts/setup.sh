#!/usr/bin/env bash
# Create .venv and install visionmoe with pinned torch/torchvision (constraints.txt).
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv"
    "$PY" -m venv .venv
fi
STAMP=.venv/.visionmoe-installed
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ constraints.txt -nt "$STAMP" ]; then
    echo "[setup] installing visionmoe and its dependencies (torch from constraints.txt; ~2 min first time)"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -c constraints.txt torch torchvision
    .venv/bin/python -m pip install -q -c constraints.txt -e ".[data,dev,export,peers]"
    touch "$STAMP"
fi
# The compiled CPU expert loop (used by default for experts of >= 256 rows; needs a C++ compiler).
.venv/bin/visionmoe build-native || echo "[setup] warning: the compiled expert loop was not built (the experts run one after another)"
# Real images that ship in Debian: Fashion-MNIST (used by the data sets; optional).
bash scripts/fetch_data.sh || echo "[setup] warning: Fashion-MNIST package not fetched; fashion_mnist data set unavailable"
