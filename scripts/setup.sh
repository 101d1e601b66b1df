#!/usr/bin/env bash
# Create (or reuse) .venv and install ditgraph into it. Usage: scripts/setup.sh [EXTRAS]
# torch is pinned here (not in pyproject) because on these machines torch 2.13.0 is a local
# CPU build that installs in seconds, while an open requirement pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==${DITGRAPH_TORCH:-2.13.0}"
if [ -n "$extras" ]; then
  python -m pip install -q -e ".[$extras]"
else
  python -m pip install -q -e .
fi
