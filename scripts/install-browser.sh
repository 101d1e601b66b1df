#!/usr/bin/env bash
# Install what the browser (UI) tests need: Debian's Chromium at /usr/bin/chromium and the
# Playwright Python package that drives it. Never `playwright install` (no browser downloads):
# the tests launch /usr/bin/chromium through executable_path. Safe to run repeatedly.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x /usr/bin/chromium ]; then
  SUDO=""
  if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
      echo "install-browser: not root and no sudo: install Debian's chromium package by hand" >&2
      exit 0
    fi
  fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq || true
  $SUDO apt-get install -y -qq chromium fonts-dejavu-core >/dev/null \
    || echo "install-browser: apt-get install chromium failed; UI tests will be skipped" >&2
fi

python -c "import playwright" 2>/dev/null || python -m pip install -q "playwright>=1.45"
python -c "import nicegui" 2>/dev/null || python -m pip install -q "nicegui>=3,<4"
echo "install-browser: chromium $( /usr/bin/chromium --version 2>/dev/null || echo missing ), playwright ready"
