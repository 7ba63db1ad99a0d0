#!/usr/bin/env bash
# Create .venv with the CPU build of torch and this package (editable) plus test tools.
# Idempotent: a second run only checks that everything is installed. pip's output goes to
# .venv/setup.log, printed (its tail) only when a step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/quietly.sh
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
log=.venv/setup.log
: > "$log"
quietly "$log" .venv/bin/python -m pip install --upgrade pip
# torch first and pinned, so nothing below can resolve a CUDA build
quietly "$log" .venv/bin/python -m pip install -c constraints.txt torch
quietly "$log" .venv/bin/python -m pip install -c constraints.txt -e ".[quantize,test,bench,optimum,quanto,torchao]"
