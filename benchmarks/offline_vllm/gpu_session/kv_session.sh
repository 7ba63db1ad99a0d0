#!/bin/bash
# GPU machine, one GPU: issue 23 alone (no vLLM): install the package with the benchmark wheels only, run the GPU
# kernel tests, then kv_speed.sh's calls (args: the calls). Started detached (setsid) like pipeline.sh; logs and a
# status line per step under /tmp/res, packed by collect.sh.
set -uo pipefail
shopt -s nullglob  # a session may carry no wheels in gpu-run/
export PYTHONUNBUFFERED=1
R=/tmp/res
mkdir -p $R
G=.carry/gpu-run
{
  python3 -m pip install -q --no-index --no-deps --no-compile .carry/gpu-wheels/b1/*.whl .carry/kvbench/*.whl $G/*.whl
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || {
    echo "editable install failed: the source folder on the path instead"
    echo "$PWD/src" > "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/intactkv_src.pth"
  }
  python3 -c "import torch, transformers, triton, intactkv_modifier.kv_quant as k; print(torch.__version__, transformers.__version__, triton.__version__, k.__name__)"
} > $R/install.log 2>&1
echo "$(date +%T) installed rc=$?" >> $R/status.txt
timeout 420 python3 -m pytest -p no:cacheprovider -q -rA ${KV_TESTS:-tests/test_static_decode_kernel.py tests/test_kv_static.py} \
  > $R/tests.log 2>&1
echo "$(date +%T) tests rc=$?" >> $R/status.txt
bash $G/kv_speed.sh $R/kv_speed "$@" > $R/kv_speed.log 2>&1
echo "$(date +%T) pipeline done" >> $R/status.txt
