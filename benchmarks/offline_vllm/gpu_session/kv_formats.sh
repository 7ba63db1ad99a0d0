#!/bin/bash
# GPU machine: vLLM's KV-cache formats on a checkpoint, plugin on and off. Args: checkpoint, windows file, out folder, formats...
ckpt=$1 windows=$2 out=$3; shift 3
python3 benchmarks/vllm_kv_formats.py --checkpoint "$ckpt" --out "$out" --windows-file "$windows" --windows 8 --gpu-memory-utilization 0.2 --formats "$@" --plugin on off
