#!/usr/bin/env bash
# The README's test command: set up the environment, then run the whole suite.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO/scripts/setup_env.sh"
cd "$REPO"
exec "$REPO/.venv/bin/python" -m pytest -q tests "$@"
