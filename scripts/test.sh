#!/usr/bin/env bash
# Install ditgraph with its test extras (and the browser for UI tests) into .venv; check the import
# layers (import-linter contracts in pyproject.toml), then run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. .venv/bin/activate 2>/dev/null || true
if [ -f scripts/install-browser.sh ]; then bash scripts/install-browser.sh; fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" lint-imports --no-cache --no-logo  # a broken contract fails here
python -m pytest "$@"
