#!/usr/bin/env bash
# Install ditgraph into .venv and run the default workflow (shapes-dit text-to-image, CPU ok).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate 2>/dev/null || true
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
ditgraph run graphs/shapes-txt2img.json --output-dir "${1:-output}"
