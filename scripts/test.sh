#!/usr/bin/env bash
# The README's test command: set up the environment, then run the whole suite.
#
# The tests run in parallel worker processes (pytest-xdist), one per CPU core up to 4, each test file on one
# worker (--dist loadfile: a file's module fixtures, such as its trained models, are built once). Most tests
# and every trainer they start use one thread, so a single worker leaves a core idle. CLIPCOMPRESS_TEST_WORKERS
# sets the count (0: no workers, everything in this process); pytest arguments pass through.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO/scripts/setup_env.sh"
cd "$REPO"
CORES="$(nproc 2>/dev/null || echo 1)"
WORKERS="${CLIPCOMPRESS_TEST_WORKERS:-$(( CORES < 4 ? CORES : 4 ))}"
exec "$REPO/.venv/bin/python" -m pytest -q -n "$WORKERS" --dist loadfile tests "$@"
