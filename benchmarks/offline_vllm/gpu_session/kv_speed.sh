#!/bin/bash
# GPU machine: issue 23's goal rows (1B-shape Llama, bf16), the calls of benchmarks/kv_cache_speed.py's docstring:
# static-16k (batch 1 at 16K, both attentions for ours static), static-4k-8k (4K batch 1, 8K at batch 16, both in
# the 16 GiB budget), static-32k, kernel-16k (batch 1 at 16K, ours static with its own attention only),
# kernel-8k-equal (8K at batch 16 only), compiled-16k, compiled-8k-equal and compiled-4k-32k (compiled rows only),
# profile-16k (torch.profiler at batch 1 and 16K, FP against ours, eager and compiled: kv_cache_profile.md), sweep
# (static_kernel_sweep.py: the static kernel's launch tuning, one layer; sweep-8k-equal: 16 rows at 8K;
# sweep-4k-32k: a smaller grid at 4K and 32K), tuning-16k (the sweep at 16K, then its fastest launch and the
# defaults end to end at 16K batch 1). Args: out folder, then the calls to run.
out=$1; shift
BW=3350; nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -q H200 && BW=4800  # H100 SXM / H200 memory bandwidth, GB/s
ARGS="--device cuda --dtype bfloat16 --threads 16 --hidden 2048 --intermediate 8192 --layers 16 --heads 32 --kv-heads 8 --vocab 128256 --steps 64 --rounds 3 --budget-steps 16 --budget-rounds 3 --budget-mib 16384 --max-batch 128 --compiled --skip-perplexity --bandwidth-gbs $BW"
for call in "$@"; do
  case $call in
    static-16k) extra="--contexts 16384 --budget-contexts --static-attention both" ;;
    static-4k-8k) extra="--contexts 4096 8192 --batch1-contexts 4096 --equal-batch 16 --equal-batch-contexts 8192 --budget-contexts" ;;
    static-32k) extra="--contexts 32768" ;;
    kernel-16k) extra="--contexts 16384 --budget-contexts" ;;
    kernel-8k-equal) extra="--contexts 8192 --batch1-contexts --equal-batch 16 --equal-batch-contexts 8192 --budget-contexts" ;;
    compiled-16k) extra="--contexts 16384 --budget-contexts --rows StaticCache static" ;;
    compiled-4k-32k) extra="--contexts 4096 32768 --budget-contexts --rows StaticCache static" ;;
    compiled-8k-equal) extra="--contexts 8192 --batch1-contexts --equal-batch 16 --equal-batch-contexts 8192 --budget-contexts --rows StaticCache static" ;;
    profile-16k) extra="--contexts 16384 --skip-speed --profile-context 16384" ;;
    sweep) echo "$(date +%T) $call"; timeout 590 python3 benchmarks/static_kernel_sweep.py --out "$out/$call"; continue ;;
    sweep-4k-32k) echo "$(date +%T) $call"
      timeout 590 python3 benchmarks/static_kernel_sweep.py --contexts 4096 32768 --tiles 32 64 --targets 264 528 1056 \
        --warps 2 4 --out "$out/$call"; continue ;;
    sweep-8k-equal) echo "$(date +%T) $call"
      timeout 590 python3 benchmarks/static_kernel_sweep.py --batch 16 --contexts 8192 --out "$out/$call"; continue ;;
    tuning-16k)  # the sweep at 16K, then its fastest launch end to end beside the defaults (compiled rows, one run each)
      echo "$(date +%T) $call sweep"
      timeout 400 python3 benchmarks/static_kernel_sweep.py --contexts 16384 --out "$out/$call/sweep"
      fastest=$(python3 benchmarks/static_kernel_sweep.py --out "$out/$call/sweep" --fastest 16384)
      for tuning in "" ${fastest:+"$fastest"}; do
        echo "$(date +%T) $call ${tuning:-defaults}"
        timeout 590 python3 benchmarks/kv_cache_speed.py $ARGS --contexts 16384 --budget-contexts --rows StaticCache "static compiled" \
          ${tuning:+--static-tuning $tuning} --out "$out/$call/${tuning// /_}"
      done
      continue ;;
    *) echo "unknown call $call"; exit 2 ;;
  esac
  echo "$(date +%T) $call"
  timeout 590 python3 benchmarks/kv_cache_speed.py $ARGS $extra --out "$out/$call"
done
