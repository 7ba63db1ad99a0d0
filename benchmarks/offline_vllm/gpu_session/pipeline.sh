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
      ps -eo etimes,pcpu,args --sort=-pcpu | grep -E "vllm_runs|vllm_serving|vllm_hybrid|kv_cache_speed|pytest|quantize" | grep -v grep | head -4 | cut -c1-150
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
GEMMA=outputs/gemma-3-270m-gptq-w4-intactkv
G=.carry/gpu-run
SERVE="python3 benchmarks/vllm_serving.py --cuda-graphs --repeats 5 --throughput-prompts 64 --new-tokens 128"
GEMMA_SERVE="$SERVE --checkpoint $GEMMA --windows-file $G/gemma_windows.pt --windows 8 --gpu-memory-utilization 0.5"
# the plugin's overhead split into vLLM's hybrid KV-cache manager (off with any connector that lacks SupportsHMA)
# and the rest: plain with the manager on, plain with it off, the plugin, alternated
GEMMA_HYBRID="python3 benchmarks/vllm_hybrid_manager_cost.py --checkpoint $GEMMA --windows-file $G/gemma_windows.pt \
  --cuda-graphs --gpu-memory-utilization 0.5 --prompts 128 --new-tokens 128 --repeats 6 --rounds 2 --out $R/gemma_hybrid"
# no -x: every TurboQuant case reports, each failure with its reason (a step cut by its time limit prints nothing)
TQ_TESTS=(python3 -m pytest -p no:cacheprovider --tb=short -rA -k "${TQ_SELECT:-turboquant or whole_prompt}" tests/test_vllm_engine.py)
quantize_gemma() { [ -f $GEMMA/config.json ] || step quantize_gemma 300 python3 $G/quantize.py outputs/gemma-3-270m $G/gemma_gptq_w4.yaml $GEMMA $G/gemma_windows.pt 32 256; }
# One engine at a time per GPU: vLLM's start-up memory profiling fails when another process on the same GPU frees
# memory meanwhile (2026-11-28: tensor parallel 2 and two TurboQuant engines did not start beside other engines).
# SmolLM2's 9 attention heads do not split over 2 ranks (vLLM refuses it): tensor parallel 2 is Gemma 3's.
if [ "$(nvidia-smi -L | wc -l)" -ge 4 ]; then
  # Four GPUs: one stream per GPU pair or GPU, each on its own cores (taskset) so engines do not share host cores.
  # GPU 3 alone from the start: the TurboQuant engine tests (every earlier run started them beside another process
  # on the same GPU), then issue 23's rows
  ( export CUDA_VISIBLE_DEVICES=3
    step tq_tests 780 taskset -c 48-63 "${TQ_TESTS[@]}"
    step kv_speed 1200 taskset -c 48-63 bash $G/kv_speed.sh $R/kv_speed static-4k-8k static-32k ) &
  STREAMS=($!)
  CUDA_VISIBLE_DEVICES=0 quantize_gemma
  # the plugin's overhead: engines alternated, tensor parallel 2 on GPUs 1-2 beside tensor parallel 1 on GPU 0, both
  # streams running from start to end so each pair sees the same neighbours
  ( CUDA_VISIBLE_DEVICES=1,2 step gemma_tp2 900 taskset -c 16-47 $GEMMA_SERVE --rounds 2 --tensor-parallel-size 2 \
      --out $R/gemma ) &
  STREAMS+=($!)
  CUDA_VISIBLE_DEVICES=0 step gemma_hybrid 720 taskset -c 0-15 $GEMMA_HYBRID
  CUDA_VISIBLE_DEVICES=0 step gemma_tp1 900 taskset -c 0-15 $GEMMA_SERVE --rounds 4 --out $R/gemma
  wait "${STREAMS[@]}"  # not a bare wait: that would wait for the monitor, which never ends
elif [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  # Two GPUs: GPU 1 alone for the TurboQuant engine tests; GPU 0 the plugin's overhead split by the hybrid manager
  # (engines alternated), then both GPUs, quiet, for one tensor-parallel-2 pair
  ( export CUDA_VISIBLE_DEVICES=1; step tq_tests 780 taskset -c 16-31 "${TQ_TESTS[@]}" ) &
  STREAMS=($!)
  CUDA_VISIBLE_DEVICES=0 quantize_gemma
  CUDA_VISIBLE_DEVICES=0 step gemma_hybrid 900 taskset -c 0-15 $GEMMA_HYBRID
  wait "${STREAMS[@]}"  # not a bare wait: that would wait for the monitor, which never ends
  CUDA_VISIBLE_DEVICES=0,1 step gemma_tp2 480 $GEMMA_SERVE --rounds 1 --tensor-parallel-size 2 --out $R/gemma
else
  # One GPU: the overhead first (nothing else on the machine), then the TurboQuant engine tests
  quantize_gemma
  step gemma_hybrid 900 $GEMMA_HYBRID
  step tq_tests 780 "${TQ_TESTS[@]}"
fi
# With time left and nothing else running: the overhead once more, quiet, in its own folder
CUDA_VISIBLE_DEVICES=0 step gemma_tp1_quiet 420 $GEMMA_SERVE --rounds 2 --out $R/gemma_quiet
echo "$(date +%T) pipeline done" >> $R/status.txt
kill $MONITOR
