#!/bin/bash
# GPU machine: issue 23's goal rows (1B-shape Llama, bf16): batch 1 at 16K and the 16 GiB budget, FP eager / FP
# StaticCache compiled / ours eager / ours static compiled (fused and plain attention), quanto and HQQ. Arg: out folder.
BW=3350; nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -q H200 && BW=4800  # H100 SXM / H200 memory bandwidth, GB/s
ARGS="--device cuda --dtype bfloat16 --threads 16 --hidden 2048 --intermediate 8192 --layers 16 --heads 32 --kv-heads 8 --vocab 128256 --steps 64 --rounds 3 --budget-steps 16 --budget-rounds 3 --budget-mib 16384 --max-batch 128 --compiled --skip-perplexity --bandwidth-gbs $BW"
python3 -m pytest -p no:cacheprovider -q -rA tests/test_kv_static.py 2>&1 | tail -n 5
python3 benchmarks/kv_cache_speed.py $ARGS --contexts 16384 --budget-contexts --static-attention both --out "$1"
