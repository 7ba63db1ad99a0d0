#!/bin/bash
# GPU machine (2 or 4 GPUs), started detached (setsid) after install.sh: the measurements in priority order.
# Logs, results and a status line per step under /tmp/res; collect.sh packs them into $OUT. The device gives the
# machine back 30 s after a call ends, whatever runs on it: keep a collect.sh call in flight until the end.
set -uo pipefail
export PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0
R=/tmp/res
mkdir -p $R
step() {
  local name=$1 limit=$2; shift 2
  echo "$(date +%T) start $name" >> $R/status.txt
  timeout "$limit" "$@" > "$R/$name.log" 2>&1
  local rc=$?
  echo "$(date +%T) end $name rc=$rc" >> $R/status.txt
}
monitor() {
  while true; do
    { date +%T; nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader; uptime
      ps -eo etimes,pcpu,args --sort=-pcpu | grep -E "vllm_runs|vllm_serving|kv_cache_speed|kv_formats|pytest|quantize" | grep -v grep | head -4 | cut -c1-150
    } >> $R/monitor.txt
    sleep 30
  done
}
# taskset pins each stream to its own cores; where the image lacks it, a stand-in runs the command unpinned
if ! command -v taskset > /dev/null; then
  mkdir -p /tmp/shim && printf '#!/bin/sh\nshift 2\nexec "$@"\n' > /tmp/shim/taskset && chmod +x /tmp/shim/taskset
  export PATH=/tmp/shim:$PATH; echo "taskset missing: streams unpinned" >> $R/status.txt
fi
monitor &
MONITOR=$!
SMOL=outputs/smollm2-gptq-w4g64
GEMMA=outputs/gemma-3-270m-gptq-w4-intactkv
G=.carry/gpu-run
SERVE="python3 benchmarks/vllm_serving.py --cuda-graphs --repeats 3 --throughput-prompts 64 --new-tokens 128"
GEMMA_SERVE="$SERVE --checkpoint $GEMMA --windows-file $G/gemma_windows.pt --windows 8 --gpu-memory-utilization 0.5"
FORMATS="auto turboquant_k8v4 turboquant_k3v4_nc turboquant_4bit_nc int4_per_token_head"
# -x: a failure prints its traceback and stops the run (a step cut by its time limit prints nothing)
TQ_TESTS=(python3 -m pytest -p no:cacheprovider -x --tb=short -rA -k "turboquant or whole_prompt" tests/test_vllm_engine.py)
quantize_smol() { [ -f $SMOL/config.json ] || step quantize_smol 300 python3 $G/quantize.py outputs/smollm2-135m-instruct $G/smollm2_gptq_w4g64.yaml $SMOL $G/smollm2_windows.pt 32 256; }
quantize_gemma() { [ -f $GEMMA/config.json ] || step quantize_gemma 300 python3 $G/quantize.py outputs/gemma-3-270m $G/gemma_gptq_w4.yaml $GEMMA $G/gemma_windows.pt 32 256; }
# Engine answers an earlier session saved (benchmarks/results/gpu/*/.../engines) are reused, not run again.
mkdir -p $R/kv_formats && cp -r benchmarks/results/gpu/smollm2-135m-instruct/kv_formats/engines $R/kv_formats/
# One engine at a time per GPU: vLLM's start-up memory profiling fails when another process on the same GPU frees
# memory meanwhile (2026-11-28: tensor parallel 2 and two TurboQuant engines did not start beside other engines).
# SmolLM2's 9 attention heads do not split over 2 ranks (vLLM refuses it): tensor parallel 2 is Gemma 3's.
if [ "$(nvidia-smi -L | wc -l)" -ge 4 ]; then
  # Four GPUs: one stream per GPU pair or GPU, each on its own cores (taskset) so engines do not share host cores.
  # GPU 3: issue 23's rows, then the TurboQuant engine tests
  ( export CUDA_VISIBLE_DEVICES=3
    step kv_speed 1200 taskset -c 48-63 bash $G/kv_speed.sh $R/kv_speed static-16k static-4k-8k static-32k
    step tq_tests 600 taskset -c 48-63 "${TQ_TESTS[@]}" ) &
  ( export CUDA_VISIBLE_DEVICES=2; quantize_smol
    step kv_formats 540 taskset -c 32-47 bash $G/kv_formats.sh $SMOL $G/smollm2_windows.pt $R/kv_formats $FORMATS ) &
  CUDA_VISIBLE_DEVICES=0 quantize_gemma
  CUDA_VISIBLE_DEVICES=0,1 step gemma_tp2 480 taskset -c 0-31 $GEMMA_SERVE --rounds 1 --tensor-parallel-size 2 --out $R/gemma
  CUDA_VISIBLE_DEVICES=0 step gemma_tp1 420 taskset -c 0-15 $GEMMA_SERVE --rounds 2 --out $R/gemma
  wait
else
  CUDA_VISIBLE_DEVICES=0 quantize_smol &
  CUDA_VISIBLE_DEVICES=1 quantize_gemma
  wait
  # Both GPUs, quiet, first: tensor parallel 2, one engine pair (an engine takes 2-2.5 min here)
  CUDA_VISIBLE_DEVICES=0,1 step gemma_tp2 480 $GEMMA_SERVE --rounds 1 --tensor-parallel-size 2 --out $R/gemma
  # GPU 1: the rest of vLLM's KV formats on SmolLM2 (vLLM 0.26 refuses TurboQuant for Gemma 3), then the TurboQuant
  # engine tests
  ( export CUDA_VISIBLE_DEVICES=1
    step kv_formats 480 bash $G/kv_formats.sh $SMOL $G/smollm2_windows.pt $R/kv_formats $FORMATS
    step tq_tests 300 "${TQ_TESTS[@]}" ) &
  STREAM=$!
  # GPU 0: issue 23's rows
  CUDA_VISIBLE_DEVICES=0 step kv_speed 540 bash $G/kv_speed.sh $R/kv_speed static-4k-8k
  wait $STREAM
  # last, with nothing else on the host: the plugin's overhead at tensor parallel 1 (engines alternated over 2 rounds)
  CUDA_VISIBLE_DEVICES=0 step gemma_tp1 420 $GEMMA_SERVE --rounds 2 --out $R/gemma
fi
# With time left and nothing else running: the overhead once more, quiet, in its own folder
CUDA_VISIBLE_DEVICES=0 step gemma_tp1_quiet 420 $GEMMA_SERVE --rounds 2 --out $R/gemma_quiet
echo "$(date +%T) pipeline done" >> $R/status.txt
kill $MONITOR
