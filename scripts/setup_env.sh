#!/usr/bin/env bash
# Create .venv (once) and install clipcompress with its test extras into it. Sourced by demo.sh / test.sh.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$REPO/.venv/bin/python" ]; then
  "$PYTHON" -m venv "$REPO/.venv"
fi
# pip skips what is already installed, so a second run costs seconds
"$REPO/.venv/bin/python" -m pip install -q -e "$REPO[dev]"
