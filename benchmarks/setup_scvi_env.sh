#!/usr/bin/env bash
# Create (or update) the separate virtualenv holding the scvi-tools baseline for
# benchmarks/bench_scvi.py.
#
# Usage: benchmarks/setup_scvi_env.sh [VENV_PATH]
#   VENV_PATH defaults to benchmarks/.venv-scvi (relative to the repo root).
#
# torch is pinned and installed FIRST: an unpinned torch would pull a multi-GB
# CUDA build; with torch==2.13.0 already present, scvi-tools' torch requirement
# is satisfied and pip installs no other torch. Safe to re-run (idempotent).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$REPO_ROOT/benchmarks/.venv-scvi}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "[setup_scvi_env] creating virtualenv at $VENV"
    "$PYTHON" -m venv "$VENV"
else
    echo "[setup_scvi_env] reusing virtualenv at $VENV"
fi

PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install --disable-pip-version-check -q "torch==$TORCH_VERSION"
"${PIP[@]}" install --disable-pip-version-check -q scvi-tools scib-metrics "pynndescent<0.7"

# Fail loudly if the resolver swapped torch out from under us.
"$VENV/bin/python" - "$TORCH_VERSION" <<'PY'
import sys

import scib_metrics
import scvi
import torch

want = sys.argv[1]
if not torch.__version__.startswith(want):
    sys.exit(f"torch {torch.__version__} installed, expected {want}")
print(f"[setup_scvi_env] ok: torch {torch.__version__}, scvi-tools {scvi.__version__}, "
      f"scib-metrics {scib_metrics.__version__}")
PY
