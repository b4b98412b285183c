#!/usr/bin/env bash
# Create .venv (once) and install clipcompress with its test extras into it, at the exact versions the test
# suite ran with (constraints.txt). Sourced by demo.sh / test.sh. docs/install.md: installing into an
# environment of your own, with your own torch.
#
#   bash scripts/setup_env.sh                          # faiss-cpu (k-means and search on the CPU)
#   CLIPCOMPRESS_FAISS=gpu bash scripts/setup_env.sh   # PyPI's GPU faiss in its place (docs/install.md)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$REPO/.venv/bin/python" ]; then
  "$PYTHON" -m venv "$REPO/.venv"
fi
PIP=("$REPO/.venv/bin/python" -m pip)
# the pins hold for the Python that constraints.txt's first line names; another one gets setup.py's ranges
TESTED="$(sed -n '1s/^# python \([0-9.]*\).*/\1/p' "$REPO/constraints.txt")"
HAVE="$("$REPO/.venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [ "$HAVE" = "$TESTED" ]; then
  PINS=(-c "$REPO/constraints.txt")
else
  PINS=()
  echo "setup_env: Python $HAVE, constraints.txt is for $TESTED: installing setup.py's version ranges" >&2
fi
# pip skips what is already installed, so a second run costs seconds
"${PIP[@]}" install -q ${PINS[@]+"${PINS[@]}"} -e "$REPO[dev]"
case "${CLIPCOMPRESS_FAISS:-cpu}" in
  cpu) ;;
  gpu)  # both wheels install the same faiss/ package: take faiss-cpu out, then write the GPU build whole
    "${PIP[@]}" uninstall -q -y faiss-cpu
    "${PIP[@]}" install -q ${PINS[@]+"${PINS[@]}"} --force-reinstall --no-deps faiss-gpu-cu12
    "${PIP[@]}" install -q ${PINS[@]+"${PINS[@]}"} faiss-gpu-cu12 ;;  # its CUDA 12 runtime wheels
  *) echo "CLIPCOMPRESS_FAISS=$CLIPCOMPRESS_FAISS: cpu or gpu" >&2; exit 2 ;;
esac
