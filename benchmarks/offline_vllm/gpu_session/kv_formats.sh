#!/bin/bash
# GPU machine: vLLM's KV-cache formats on a checkpoint, plugin on and off. Args: checkpoint, out folder, formats...
ckpt=$1 out=$2; shift 2
python3 benchmarks/vllm_kv_formats.py --checkpoint "$ckpt" --out "$out" --windows-file .carry/gpu-run/gemma_windows.pt --windows 8 --formats "$@" --plugin on off
