#!/bin/bash
# GPU machine (2 GPUs), started detached (setsid) after install.sh: the measurements in priority order.
# Logs, results and a status line per step under /tmp/res; collect.sh packs them into $OUT.
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
  if [ $rc -ge 124 ]; then pkill -9 -f "intactkv_modifier.eval.vllm_runs" 2>/dev/null; fi  # an engine a timed-out step left
}
monitor() {
  while true; do
    { date +%T; nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader
      ps -eo etimes,pcpu,args --sort=-pcpu | grep -E "vllm_runs|vllm_serving|kv_cache_speed|kv_formats|pytest|quantize" | grep -v grep | head -4 | cut -c1-150
    } >> $R/monitor.txt
    sleep 30
  done
}
monitor &
MONITOR=$!
SMOL=outputs/smollm2-gptq-w4g64
GEMMA=outputs/gemma-3-270m-gptq-w4-intactkv
G=.carry/gpu-run
[ -f $SMOL/config.json ] || CUDA_VISIBLE_DEVICES=0 step quantize_smol 300 python3 $G/quantize.py outputs/smollm2-135m-instruct $G/smollm2_gptq_w4g64.yaml $SMOL $G/smollm2_windows.pt 32 256 &
QUANTIZE=$!
[ -f $GEMMA/config.json ] || CUDA_VISIBLE_DEVICES=1 step quantize_gemma 300 python3 $G/quantize.py outputs/gemma-3-270m $G/gemma_gptq_w4.yaml $GEMMA $G/gemma_windows.pt 32 256
wait $QUANTIZE
SERVE="python3 benchmarks/vllm_serving.py --cuda-graphs --repeats 3 --throughput-prompts 64 --new-tokens 128"
# both GPUs first: tensor parallel 2 (SmolLM2's 9 attention heads do not split over 2 ranks; vLLM refuses it)
export CUDA_VISIBLE_DEVICES=0,1
step gemma_tp2 480 $SERVE --checkpoint $GEMMA --windows-file $G/gemma_windows.pt --windows 8 --rounds 1 --tensor-parallel-size 2 --out $R/gemma
step tp2_tests 420 python3 -m pytest -p no:cacheprovider -q -rA -m gpu -k tensor_parallel tests/test_vllm_engine.py
# then GPU 1: vLLM's KV formats in two engine streams (30 % of the card each), then the backend tests
( export CUDA_VISIBLE_DEVICES=1
  step kv_formats_a 720 bash $G/kv_formats.sh $GEMMA $R/kv_formats auto turboquant_k8v4 turboquant_k3v4_nc ) &
STREAM_A=$!
( export CUDA_VISIBLE_DEVICES=1; sleep 45
  step kv_formats_b 720 bash $G/kv_formats.sh $GEMMA $R/kv_formats turboquant_4bit_nc int4_per_token_head
  step gpu_serving_tests 540 python3 -m pytest -p no:cacheprovider -q -rA -k "backends or turboquant or whole_prompt" tests/test_vllm_engine.py ) &
# and GPU 0: the throughput runs alone on their card, then issue 23's rows
export CUDA_VISIBLE_DEVICES=0
step smol_tp1 600 $SERVE --checkpoint $SMOL --windows-file $G/smollm2_windows.pt --windows 16 --rounds 2 --out $R/smol
step gemma_tp1 480 $SERVE --checkpoint $GEMMA --windows-file $G/gemma_windows.pt --windows 8 --rounds 1 --out $R/gemma
step kv_speed 600 bash $G/kv_speed.sh $R/kv_speed
wait $STREAM_A $STREAM_B
step kv_formats_table 120 bash $G/kv_formats.sh $GEMMA $R/kv_formats
echo "$(date +%T) pipeline done" >> $R/status.txt
kill $MONITOR
