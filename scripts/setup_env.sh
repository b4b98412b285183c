#!/usr/bin/env bash
# Create .venv (once) and install clipcompress with its test extras into it. Sourced by demo.sh / test.sh.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$REPO/.venv/bin/python" ]; then
  "$PYTHON" -m venv "$REPO/.venv"
fi
# faiss: exactly one build (setup.py's cpu / gpu extras install the same `faiss` package): the GPU one
# where a GPU answers, unless CLIPCOMPRESS_FAISS=cpu|gpu says otherwise
FAISS="${CLIPCOMPRESS_FAISS:-auto}"
if [ "$FAISS" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then FAISS=gpu; else FAISS=cpu; fi
fi
case "$FAISS" in
  cpu) OTHER="faiss-gpu faiss-gpu-cu11 faiss-gpu-cu12" ;;
  gpu) OTHER="faiss-cpu" ;;
  *) echo "CLIPCOMPRESS_FAISS=$FAISS: one of auto, cpu, gpu" >&2; exit 2 ;;
esac
# the other build would share faiss/ with this one: take it out first (a no-op when it is not there)
for dist in $OTHER; do
  if "$REPO/.venv/bin/python" -m pip show -q "$dist" >/dev/null 2>&1; then
    "$REPO/.venv/bin/python" -m pip uninstall -q -y "$dist"
    FORCE=1
  fi
done
# pip skips what is already installed, so a second run costs seconds
"$REPO/.venv/bin/python" -m pip install -q -e "$REPO[dev,$FAISS]"
if [ "${FORCE:-0}" = 1 ]; then  # the uninstall removed files the kept build also owns: write them again
  if [ "$FAISS" = gpu ]; then KEEP=faiss-gpu-cu12; else KEEP=faiss-cpu; fi
  "$REPO/.venv/bin/python" -m pip install -q --force-reinstall --no-deps "$KEEP"
fi
