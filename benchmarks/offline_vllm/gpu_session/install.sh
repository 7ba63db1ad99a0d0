#!/bin/bash
# GPU machine: install the carried vLLM kit + benchmark wheels, assemble the GGUFs (carried to /tmp/smol, /tmp/gemma) and prepare both models.
set -euo pipefail
export PYTHONUNBUFFERED=1
mkdir -p /tmp/kit && cp .carry/gpu-wheels/b1/* .carry/kit-tools/* /tmp/kit/
KIT=/tmp/kit REPO=$PWD bash /tmp/kit/install_kit.sh
python3 -m pip install -q --no-index --no-deps --no-compile .carry/kvbench/*.whl .carry/gpu-run/*.whl
# SmolLM2 is optional (a session that measures only Gemma 3 does not carry it)
if compgen -G "/tmp/smol/*.part??" > /dev/null; then
  cat /tmp/smol/*.part?? > /tmp/smol/smol.gguf
  echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  /tmp/smol/smol.gguf" | sha256sum -c
  intactkv prepare smollm2-135m-instruct --gguf /tmp/smol/smol.gguf --out outputs/smollm2-135m-instruct -q
fi
cat /tmp/gemma/*.part?? > /tmp/gemma/gemma.gguf
echo "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818  /tmp/gemma/gemma.gguf" | sha256sum -c
intactkv prepare gemma-3-270m --gguf /tmp/gemma/gemma.gguf --out outputs/gemma-3-270m -q
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
