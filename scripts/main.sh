#!/usr/bin/env bash
# Main job: install everything, then quantize models/pivot-llama with GPTQ (3-bit, group 128) + IntactKV,
# save the compressed-tensors checkpoint, reload it with transformers and print the perplexity table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ ! -e /usr/share/dictd/gcide.dict.dz ] || [ ! -d /usr/share/doc/python3.11/html/_sources ]; then
  # the real-English corpus (see src/intactkv_modifier/eval/corpus.py); needs root, as on the project's machines
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dict-gcide python3.11-doc > /dev/null
fi
exec .venv/bin/python examples/quantize_pivot_llama.py "$@"
